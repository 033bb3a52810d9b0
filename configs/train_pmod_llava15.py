r"""p-MoD fine-tuning of LLaVA-1.5-7B: p-MoD *is* LLaVA-1.5's stage 2 (instruction tuning)
with MoD routers, so it starts where that stage starts, from three parts (as the
official scripts do: --model_name_or_path lmsys/vicuna-7b-v1.5, --vision_tower
openai/clip-vit-large-patch14-336, --pretrain_mm_mlp_adapter .../mm_projector.bin):

  model.llm           lmsys/vicuna-7b-v1.5: a LlamaForCausalLM directory (safetensors)
  model.vision_tower  openai/clip-vit-large-patch14-336: a CLIPModel directory
  model.projector     stage 1's projector, mm_projector.bin of
                      liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5, converted
                      to safetensors (the loader says how)
  model.tokenizer     a Llama tokenizer.json (Vicuna ships only tokenizer.model), e.g.
                      llava-hf/llava-1.5-7b-hf's; "" : the LLM directory's

Run, with the 665k instruction mix written by tokred_jax.data.build_dataset for the
336 px CLIP tower:

  python train.py --config=configs/train_pmod_llava15.py \
      --config.model.llm=/models/vicuna-7b-v1.5 \
      --config.model.vision_tower=/models/clip-vit-large-patch14-336 \
      --config.model.projector=/models/llava-v1.5-pretrain/mm_projector.safetensors \
      --config.model.tokenizer=/models/llava-1.5-7b-hf/tokenizer.json \
      --config.data.dataset=llava_conversations/mix665k_336 \
      --config.data.data_dir=/data/tfds --workdir=/ckpt/pmod-llava15-7b

The recipe (the official finetune_eval_7b_pmod_llava_1_5.sh): plain cross-entropy on the
replies in the vicuna_v1 conversation template (`data.template`), AdamW at 2e-5 with 3%
linear warmup and cosine decay, no weight decay, global batch 128, one epoch, images
padded to a square.
Zero-initialised routers on the layers PRD's shifted cosine routes (8..31 of 32; the
official shiftedcos_decay_0.85_0.15 with factor 0.5, TanhNorm α 0.2), so training starts
from the dense model; the LLM, projector and routers train, the tower is frozen.
Each decoder layer is rematerialised (the official --gradient_checkpointing): without it
one 2048-token sample needs about 32 GB of activations. `data.batch_size` is per host: on
H hosts set it to 128 / H. Raise `optim.accum_steps` where 128 sequences of 2048 tokens
do not fit in one step.
"""

from ml_collections import config_dict

from configs import train_tiny

# LLaVA-1.5 and p-MoD train (and evaluate) in this conversation template.
TEMPLATE = "vicuna_v1"


def get_config(arg=None):
  """No arg: the parts are `model.llm`, `model.vision_tower` and `model.projector`."""
  if arg is not None:
    raise ValueError(f"configs/train_pmod_llava15.py takes no argument (got {arg!r}); give "
                     "the parts as --config.model.llm=DIR --config.model.vision_tower=DIR "
                     "--config.model.projector=FILE.")
  config = train_tiny.get_config()
  config.model.llm = config_dict.placeholder(str)
  config.model.vision_tower = config_dict.placeholder(str)
  config.model.projector = config_dict.placeholder(str)
  config.model.tokenizer = config_dict.placeholder(str)
  config.model.dtype = "bfloat16"
  config.model.remat = True
  config.model.method = "pmod"
  config.model.add_routers = "cosine"

  config.data.batch_size = 128
  config.data.max_length = 2048
  config.data.template = TEMPLATE
  config.num_steps = 665_298 // 128  # one epoch of llava_v1_5_mix665k

  config.optim.learning_rate = 2e-5
  config.optim.warmup_fraction = 0.03
  config.optim.weight_decay = 0.0
  config.optim.freeze = "^vision/"

  config.log_every = 10
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  return config
