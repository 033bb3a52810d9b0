"""Training data: LLaVA conversation JSON -> TFDS array_record -> grain batches.

Nothing here needs TensorFlow: the TFDS builder stores images as uint8 tensors, and
reading goes through `tfds.data_source` (array_record, random access) into grain.

  builder.py       `build_dataset`: the TFDS builder for llava_v1_5_mix665k-style JSON.
  conversation.py  turn checks, tokens and reply targets in the model's chat template.
  pipeline.py      `make_dataset`: shuffle, repeat, tokenize, batch; resumable iterator.
  skips.py         bad samples: `BadSample`, and `SkipLog`, their tally.

Where each bad sample is caught (`on_bad_sample`: "skip" leaves it out and logs its id,
"error" raises `BadSample` naming it):

  | check                         | stage | why there                                    |
  |-------------------------------|-------|----------------------------------------------|
  | missing image file            | build | the image is decoded when building           |
  | unreadable image              | build | likewise                                     |
  | no image (text-only sample)   | build | a property of the data alone                 |
  | malformed conversation        | build | likewise (re-checked when tokenizing)        |
  | no assistant turn             | build | likewise                                     |
  | longer than max_length        | read  | depends on the tokenizer, the image token    |
  |                               |       | count and max_length, not on the data alone  |

Build-time skips are logged with a summary and saved in the data set's metadata.json;
read-time skips are logged as they happen with the running tally, in the training
process. Either way a bad sample is never trained on.
"""

from tokred_jax.data.builder import (DATASET, ConversationsConfig, LlavaConversations,
                                     build_dataset)
from tokred_jax.data.conversation import (encode_example, parse_turns,
                                          tokenize_conversation)
from tokred_jax.data.pipeline import DataConfig, make_dataset, shard
from tokred_jax.data.skips import BadSample, SkipLog

__all__ = ["DATASET", "BadSample", "ConversationsConfig", "DataConfig", "LlavaConversations",
           "SkipLog", "build_dataset", "encode_example", "make_dataset",
           "parse_turns", "shard", "tokenize_conversation"]
