"""Chat templates, token for token against restatements of the official conversation code.

The `official_*` functions below restate, for these tests, what the original LLaVA
(llava/conversation.py SeparatorStyle.TWO, llava/mm_utils.py tokenizer_image_token,
llava/train/train.py preprocess_v1) and LLaVA-NeXT (SeparatorStyle.CHATML with
conv_qwen, preprocess_qwen) do, run with a transformers tokenizer wrapping the same
tokenizer.json our `processing.Tokenizer` reads; llava-hf's is transformers' own
`apply_chat_template` with the chat template llava-hf ships.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import transformers
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

import tokred_jax
from tokred_jax.data import encode_example
from tokred_jax.io import checkpoint, llava_original, processing, templates
from tokred_jax.models.config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from tokred_jax.train import trainer
from tests import faults

IGNORE = -100
IMAGE = "<image>"
# The chat template of llava-hf/llava-1.5-7b-hf (chat_template.json).
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
SINGLE = [("<image>\nWhat is shown in this image?", "A small red cat sits on a mat.")]
MULTI = [("<image>\nWhat is shown in this image?", "A small red cat."),
         ("How many people are there?", "Three people are standing near the water."),
         ("What colour is the car?", "The car is blue.")]
_CORPUS = [templates.VICUNA_SYSTEM, templates.LLAVA_SYSTEM, templates.QWEN_SYSTEM,
           "USER: ASSISTANT: system user assistant"] + [t for q, a in MULTI for t in (q, a)]


# The official code, restated.

def official_two_prompt(system, messages, sep=" ", sep2="</s>"):
  """conversation.py, SeparatorStyle.TWO: messages are (role, text or None)."""
  seps = [sep, sep2]
  ret = system + seps[0]
  for i, (role, message) in enumerate(messages):
    ret += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
  return ret


def official_tokenizer_image_token(prompt, hf_tok, image_id):
  """mm_utils.py: chunks around <image> tokenized alone, BOS kept on the first only."""
  chunks = [hf_tok(chunk).input_ids for chunk in prompt.split(IMAGE)]
  ids, offset = [], 0
  if chunks and chunks[0] and chunks[0][0] == hf_tok.bos_token_id:
    offset = 1
    ids.append(chunks[0][0])
  separated = [x for chunk in chunks for x in (chunk, [image_id] * (offset + 1))][:-1]
  for x in separated:
    ids.extend(x[offset:])
  return ids


def official_preprocess_v1(conversation, hf_tok, image_id, sep=" ASSISTANT: ", sep2="</s>"):
  """train.py preprocess_v1 on one rendered conversation (a legacy tokenizer: no
  adjustment of later rounds). Returns the ids and the targets (IGNORE where masked)."""
  ids = official_tokenizer_image_token(conversation, hf_tok, image_id)
  target = np.array(ids)
  total_len = int(np.sum(target != hf_tok.pad_token_id))
  cur_len = 1
  target[:cur_len] = IGNORE
  for rou in conversation.split(sep2):
    if rou == "":
      break
    parts = rou.split(sep)
    if len(parts) != 2:
      break
    parts[0] += sep
    round_len = len(official_tokenizer_image_token(rou, hf_tok, image_id))
    instruction_len = len(official_tokenizer_image_token(parts[0], hf_tok, image_id)) - 2
    target[cur_len:cur_len + instruction_len] = IGNORE
    cur_len += round_len
  target[cur_len:] = IGNORE
  assert cur_len == total_len, "the official code would mask the whole sample"
  return ids, target


QWEN_SYSTEM_TURN = "<|im_start|>system\n" + templates.QWEN_SYSTEM
QWEN_ROLES = ("<|im_start|>user", "<|im_start|>assistant")


def official_chatml_prompt(system, messages, sep="<|im_end|>"):
  """LLaVA-NeXT conversation.py, SeparatorStyle.CHATML (conv_qwen)."""
  ret = "" if system == "" else system + sep + "\n"
  for role, message in messages:
    ret += role + "\n" + message + sep + "\n" if message else role + "\n"
  return ret


def official_preprocess_qwen(pairs, hf_tok, system_message=templates.QWEN_SYSTEM):
  """LLaVA-NeXT train.py preprocess_qwen: each message through the bare ChatML chat
  template; assistant messages are targets whole, and every "\\n", <|im_start|> and
  <|im_end|> token is a target too. Returns ids, targets and the per-message ids."""
  chat = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")

  def encode(role, content):
    text = hf_tok.apply_chat_template([{"role": role, "content": content}],
                                      chat_template=chat, tokenize=False)
    return hf_tok(text, add_special_tokens=False).input_ids

  messages = [("system", system_message)] + [
      m for q, a in pairs for m in (("user", q), ("assistant", a))]
  ids, target, pieces = [], [], []
  for role, content in messages:
    piece = encode(role, content)
    pieces.append((role, piece))
    ids += piece
    target += piece if role == "assistant" else [IGNORE] * len(piece)
  unmask = {hf_tok("\n").input_ids[0], hf_tok.convert_tokens_to_ids("<|im_start|>"),
            hf_tok.convert_tokens_to_ids("<|im_end|>")}
  target = np.array([t if i not in unmask else i for i, t in zip(ids, target)])
  return ids, target, pieces


# Tokenizers: byte-level (Llama-2 ids), sentencepiece-style, and Qwen's ChatML.

def _hf(file, **special):
  return transformers.PreTrainedTokenizerFast(tokenizer_file=str(file), **special)


def _llama_style(path):
  """A Llama/Vicuna tokenizer.json: spaces marked "▁" by the normalizer, BOS added."""
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")  # Training only.
  alphabet = sorted(set("".join(_CORPUS)) | set("▁\n"))
  tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet,
      show_progress=False))
  tok.pre_tokenizer = None
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                         normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  tok.add_special_tokens([IMAGE, "<pad>"])
  tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", 1)])
  tok.save(str(path))


@pytest.fixture(scope="module", params=["byte-level", "llama-style"])
def llama_tok(request, clip_llama_dir, tmp_path_factory):
  """(our tokenizer, the transformers one on the same file, the model config)."""
  cfg = checkpoint.read_config(clip_llama_dir)
  file = clip_llama_dir / "tokenizer.json"
  if request.param == "llama-style":
    file = tmp_path_factory.mktemp("llama_style") / "tokenizer.json"
    _llama_style(file)
    raw = Tokenizer.from_file(str(file))
    cfg = dataclasses.replace(cfg, image_token_id=raw.token_to_id(IMAGE),
                              pad_token_id=raw.token_to_id("<pad>"))
  ours = processing.Tokenizer.load(file, cfg)
  # LLaVA's training pads with the unk token.
  hf = _hf(file, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
  return ours, hf, cfg


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  tok.add_special_tokens([IMAGE])
  file = tmp_path_factory.mktemp("qwen") / "tokenizer.json"
  tok.save(str(file))
  cfg = LlavaConfig(
      vision=VisionConfig(kind="siglip", hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=4, image_size=56, patch_size=14),
      text=TextConfig(kind="qwen2", vocab_size=400, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      attention_bias=True, bos_token_id=None,
                      eos_token_id=tok.token_to_id("<|im_end|>")),
      image_token_id=tok.token_to_id(IMAGE), pad_token_id=0, template="qwen")
  return processing.Tokenizer.load(file, cfg), _hf(file), cfg


def _no_unknowns(ids, tok):
  assert tok.token_id("<unk>") not in ids, "the test text holds characters the toy vocabulary lacks"


# vicuna_v1 / llava_v1: LLaVA-1.5 and p-MoD.

@pytest.mark.parametrize("name, system", [("vicuna_v1", templates.VICUNA_SYSTEM),
                                          ("llava_v1", templates.LLAVA_SYSTEM)])
@pytest.mark.parametrize("pairs", [SINGLE, MULTI], ids=["single", "multi"])
def test_v1_prompt_equals_the_official_conversation(llama_tok, name, system, pairs):
  ours, hf, cfg = llama_tok
  template = templates.get(name)
  *history, (question, _) = pairs
  messages = [m for q, a in pairs[:-1] for m in (("USER", q), ("ASSISTANT", a))]
  want_text = official_two_prompt(system, messages + [("USER", question), ("ASSISTANT", None)])
  text = template.prompt(question.replace(IMAGE + "\n", ""), history)  # Image added.
  assert text == want_text
  want = official_tokenizer_image_token(want_text, hf, cfg.image_token_id)
  _no_unknowns(want, ours)
  batch = processing.encode_batch(ours, [text], cfg, 1, [256], 256, template)
  np.testing.assert_array_equal(batch["input_ids"][0][batch["attention_mask"][0]], want)


@pytest.mark.parametrize("pairs", [SINGLE, MULTI], ids=["single", "multi"])
def test_v1_training_targets_equal_preprocess_v1(llama_tok, pairs):
  ours, hf, cfg = llama_tok
  messages = [m for q, a in pairs for m in (("USER", q), ("ASSISTANT", a))]
  conversation = official_two_prompt(templates.VICUNA_SYSTEM, messages)
  want_ids, want_target = official_preprocess_v1(conversation, hf, cfg.image_token_id)
  _no_unknowns(want_ids, ours)
  ids, target = templates.get("vicuna_v1").training_ids(ours, pairs)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(target, want_target != IGNORE)
  assert target.sum() > len(pairs)  # Answers, not only their EOS.
  # The data pipeline's arrays: labels[t] is ids[t + 1], learnt where the target is.
  conversations = [{"from": f, "value": v} for q, a in pairs
                   for f, v in (("human", q), ("gpt", a))]
  ex = encode_example(ours, dataclasses.replace(cfg, template="vicuna_v1"), "x",
                      conversations, 256, num_image_tokens=1)
  n = len(want_ids)
  np.testing.assert_array_equal(ex["input_ids"][:n], want_ids)
  np.testing.assert_array_equal(ex["loss_mask"][:n - 1], want_target[1:] != IGNORE)


def test_vicuna_v1_and_tokred_differ_only_by_the_system_prompt(llama_tok):
  ours, _, _ = llama_tok
  vicuna, tokred = templates.get("vicuna_v1"), templates.get("tokred")
  assert vicuna.prompt("Hi?") == templates.VICUNA_SYSTEM + " " + tokred.prompt("Hi?")
  assert vicuna.prompt("Hi?", system="") == " " + tokred.prompt("Hi?")  # As the official.
  _, mask = tokred.training_ids(ours, MULTI)
  _, vicuna_mask = vicuna.training_ids(ours, MULTI)
  assert mask.sum() == vicuna_mask.sum()


# llava-hf.

def _hf_messages(pairs, question=None, system=None, eos=""):
  messages = [] if system is None else [
      {"role": "system", "content": [{"type": "text", "text": system}]}]
  turns = [(q, a) for q, a in pairs] + ([(question, None)] if question else [])
  for q, a in turns:
    content = [{"type": "text", "text": q.replace(IMAGE + "\n", "")}]
    if IMAGE in q:
      content.insert(0, {"type": "image"})
    messages.append({"role": "user", "content": content})
    if a is not None:
      messages.append({"role": "assistant", "content": [{"type": "text", "text": a + eos}]})
  return messages


@pytest.mark.parametrize("pairs, system", [(SINGLE, None), (MULTI, None),
                                           (MULTI, "Answer briefly.")],
                         ids=["single", "multi", "system"])
def test_llava_hf_prompt_equals_apply_chat_template(clip_llama_dir, pairs, system):
  cfg = checkpoint.read_config(clip_llama_dir)
  ours = processing.Tokenizer.load(clip_llama_dir, cfg)
  hf = _hf(clip_llama_dir / "tokenizer.json", bos_token="<s>", eos_token="</s>")
  *history, (question, _) = pairs
  text = hf.apply_chat_template(_hf_messages(history, question, system),
                                chat_template=LLAVA_HF_CHAT_TEMPLATE,
                                add_generation_prompt=True, tokenize=False)
  template = templates.get("llava-hf")
  kwargs = {} if system is None else {"system": system}
  assert template.prompt(question, history, **kwargs) == text
  want = hf(text).input_ids  # LlavaProcessor: BOS, the rendered text as one.
  batch = processing.encode_batch(ours, [text], cfg, 1, [256], 256, template)
  np.testing.assert_array_equal(batch["input_ids"][0][batch["attention_mask"][0]], want)
  if not history:  # One question: the same prompt as the embedded models' format.
    assert text == processing.build_prompt(question.replace(IMAGE + "\n", ""))


def test_llava_hf_training_is_the_chat_template_with_eos_closing_each_answer(clip_llama_dir):
  cfg = checkpoint.read_config(clip_llama_dir)
  ours = processing.Tokenizer.load(clip_llama_dir, cfg)
  hf = _hf(clip_llama_dir / "tokenizer.json", bos_token="<s>", eos_token="</s>")
  out = hf.apply_chat_template(_hf_messages(MULTI, eos="</s>"),
                               chat_template=LLAVA_HF_CHAT_TEMPLATE, tokenize=True,
                               return_dict=True, return_assistant_tokens_mask=True)
  text = hf.apply_chat_template(_hf_messages(MULTI, eos="</s>"),
                                chat_template=LLAVA_HF_CHAT_TEMPLATE, tokenize=False)
  template = templates.get("llava-hf")
  assert template.conversation(MULTI, "</s>")[0] == text
  ids, target = template.training_ids(ours, MULTI)
  np.testing.assert_array_equal(ids, hf(text).input_ids)
  np.testing.assert_array_equal(ids[1:], out["input_ids"])  # Without BOS.
  # Ours are transformers' assistant tokens but for lone spaces: the one before an answer
  # is ours (the reply starts at it, as preprocess_v1 has it), the one after theirs.
  assistant = np.r_[False, np.asarray(out["assistant_masks"], bool)]
  differ = np.flatnonzero(target != assistant)
  assert len(differ) and all(hf.convert_ids_to_tokens(int(ids[i])) == "Ġ" for i in differ)
  runs = np.flatnonzero(np.diff(np.r_[0, target.astype(int), 0]))
  for (start, end), (_, answer) in zip(runs.reshape(-1, 2), MULTI):
    assert ours.decode(ids[start:end]).strip() == answer and ids[end - 1] == 2


# Qwen (LLaVA-OneVision's qwen_1_5).

@pytest.mark.parametrize("pairs", [SINGLE, MULTI], ids=["single", "multi"])
def test_qwen_prompt_equals_the_official_conversation(qwen_tok, pairs):
  ours, hf, cfg = qwen_tok
  *history, (question, _) = pairs
  messages = [m for q, a in history for m in ((QWEN_ROLES[0], q), (QWEN_ROLES[1], a))]
  want_text = official_chatml_prompt(
      QWEN_SYSTEM_TURN, messages + [(QWEN_ROLES[0], question), (QWEN_ROLES[1], None)])
  template = templates.get("qwen")
  text = template.prompt(question, history)
  assert text == want_text
  want = official_tokenizer_image_token(want_text, hf, cfg.image_token_id)
  batch = processing.encode_batch(ours, [text], cfg, 1, [256], 256, template)
  np.testing.assert_array_equal(batch["input_ids"][0][batch["attention_mask"][0]], want)


@pytest.mark.parametrize("pairs", [SINGLE, MULTI], ids=["single", "multi"])
def test_qwen_training_ids_equal_preprocess_qwen(qwen_tok, pairs):
  ours, hf, _ = qwen_tok
  want_ids, want_target, pieces = official_preprocess_qwen(pairs, hf)
  ids, target = templates.get("qwen").training_ids(ours, pairs)
  np.testing.assert_array_equal(ids, want_ids)
  # preprocess_qwen also learns every role header, "\n", <|im_start|> and <|im_end|>;
  # ours are what preprocess_v1 learns: the answers and the separator ending them, i.e.
  # each assistant message less its "<|im_start|>assistant\n" header and final "\n".
  header = len(hf("<|im_start|>assistant\n", add_special_tokens=False).input_ids)
  want = np.concatenate([np.r_[np.zeros(header, bool), np.ones(len(p) - header - 1, bool),
                               False] if role == "assistant" else np.zeros(len(p), bool)
                         for role, p in pieces])
  np.testing.assert_array_equal(target, want)
  assert not (target & (want_target == IGNORE)).any()


def test_qwen_needs_chatml_tokens(clip_llama_dir):
  cfg = checkpoint.read_config(clip_llama_dir)
  tok = processing.Tokenizer.load(clip_llama_dir, cfg)
  prompt = processing.build_prompt("Hi?", "qwen")
  with pytest.raises(ValueError, match=r"no <\|im_start\|> token.*choose the template") as e:
    processing.encode_batch(tok, [prompt], cfg, 1, [64], 64, "qwen")
  faults.record("processing.encode_batch", "template='qwen' with a tokenizer lacking "
                "<|im_start|>", str(e.value), before="compile")
  with pytest.raises(ValueError, match=r"no <\|im_start\|> token"):
    templates.get("qwen").training_ids(tok, SINGLE)


# tokred: the embedded models' format, as it was before templates existed.

def test_tokred_is_the_embedded_models_format(llama_tok):
  ours, _, cfg = llama_tok
  template = templates.get("tokred")
  text = "USER: <image>\nWhat? ASSISTANT: A cat.</s>USER: More? ASSISTANT: No.</s>"
  assert template.conversation([("<image>\nWhat?", "A cat."), ("More?", "No.")],
                               "</s>")[0] == text
  assert template.prompt("What?") == "USER: <image>\nWhat? ASSISTANT:"
  assert template.prompt("More?", [("<image>\nWhat?", "A cat.")]) == (
      "USER: <image>\nWhat? ASSISTANT: A cat.</s>USER: More? ASSISTANT:")
  ids, target = template.training_ids(ours, [("<image>\nWhat?", "A cat.")])
  np.testing.assert_array_equal(ids, ours.encode("USER: <image>\nWhat? ASSISTANT: A cat.</s>"))
  assert ours.decode(ids[target]).strip() == "A cat." and ids[target][-1] == cfg.text.eos_ids[0]


# Which template a checkpoint gets.

def _config_only(src, dst, **extra):
  dst.mkdir()
  d = json.loads((src / "config.json").read_text())
  (dst / "config.json").write_text(json.dumps({**d, **extra}))
  return dst


def test_each_checkpoint_gets_its_default(clip_llama_dir, siglip_qwen2_dir, tmp_path):
  assert checkpoint.read_config(tokred_jax.DEFAULT_CHECKPOINT).template == "tokred"
  assert checkpoint.read_config(clip_llama_dir).template == "tokred"
  assert checkpoint.read_config(siglip_qwen2_dir).template == "qwen"
  shipped = _config_only(clip_llama_dir, tmp_path / "hf")
  (shipped / "chat_template.json").write_text(json.dumps(
      {"chat_template": LLAVA_HF_CHAT_TEMPLATE}))
  assert checkpoint.read_config(shipped).template == "llava-hf"
  older = _config_only(clip_llama_dir, tmp_path / "older")
  (older / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": LLAVA_HF_CHAT_TEMPLATE}))
  assert checkpoint.read_config(older).template == "llava-hf"
  recorded = _config_only(clip_llama_dir, tmp_path / "recorded",
                          conversation_template="vicuna_v1")
  shutil.copy(shipped / "chat_template.json", recorded)
  assert checkpoint.read_config(recorded).template == "vicuna_v1"  # The record wins.
  original = llava_original.original_config(
      {"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu",
       "mm_vision_tower": "openai/clip-vit-large-patch14-336"})
  assert original.template == "vicuna_v1"


def test_saved_checkpoints_record_their_template(clip_llama_dir, tmp_path):
  cfg, params = checkpoint.load_checkpoint(clip_llama_dir)
  out = tmp_path / "out"
  checkpoint.save_checkpoint(out, dataclasses.replace(cfg, template="vicuna_v1"), params)
  assert json.loads((out / "config.json").read_text())["conversation_template"] == "vicuna_v1"
  assert checkpoint.read_config(out).template == "vicuna_v1"


def test_the_user_chooses_the_template():
  pipe = tokred_jax.Pipeline.load(tokred_jax.TINY_CHECKPOINT, template="vicuna_v1")
  assert pipe.cfg.template == "vicuna_v1"
  hf = _hf(os.path.join(tokred_jax.TINY_CHECKPOINT, "tokenizer.json"), bos_token="<s>",
           eos_token="</s>")
  n = pipe.cfg.num_image_tokens
  batch = pipe.prepare([np.zeros((8, 8, 3), np.uint8)], ["What is in the image?"])
  want = official_tokenizer_image_token(official_two_prompt(
      templates.VICUNA_SYSTEM, [("USER", "<image>\nWhat is in the image?"),
                                ("ASSISTANT", None)]), hf, pipe.cfg.image_token_id)
  want, _ = processing.expand_image_token(want, pipe.cfg.image_token_id, n)
  np.testing.assert_array_equal(batch["input_ids"][0][batch["attention_mask"][0]], want)
  # A per-call choice overrides the model's.
  plain = pipe.prepare([np.zeros((8, 8, 3), np.uint8)], ["What is in the image?"],
                       template="tokred")
  assert plain["attention_mask"].sum() < batch["attention_mask"].sum()


# Unknown names: one line listing the known ones, before anything is loaded.

def test_unknown_template_names(tmp_path, clip_llama_dir):
  with pytest.raises(ValueError, match="unknown chat template 'vicuna'; choose one of "
                     "tokred, llava-hf, vicuna_v1, llava_v1, qwen") as e:
    templates.get("vicuna")
  faults.record("templates.get", "'vicuna'", str(e.value), before="-")
  missing = tmp_path / "no-such-checkpoint"
  with pytest.raises(ValueError, match="unknown chat template 'nope'") as e:
    tokred_jax.Pipeline.load(str(missing), template="nope")  # Before the path is read.
  faults.record("Pipeline.load", "template='nope'", str(e.value), before="weights load")
  bad = _config_only(clip_llama_dir, tmp_path / "bad", conversation_template="nope")
  with pytest.raises(checkpoint.CheckpointError, match="unknown chat template 'nope'") as e:
    checkpoint.read_config(bad)
  faults.record("checkpoint.read_config", 'config.json "conversation_template": "nope"',
                str(e.value), before="weights load")
  config = trainer_config()
  config.data.template = "nope"
  with pytest.raises(ConfigError, match="unknown chat template 'nope'") as e:
    trainer.model_config(config)
  faults.record("train.py", "--config.data.template=nope", str(e.value),
                before="weights load")
  with pytest.raises(ValueError, match="tokred template has no system prompt"):
    templates.get("tokred").prompt("Hi?", system="Be brief.")


def trainer_config():
  from configs import train_tiny  # pylint: disable=g-import-not-at-top
  return train_tiny.get_config("synthetic")


def test_training_records_the_chosen_template():
  config = trainer_config()
  assert trainer.model_config(config).template == "tokred"
  config.data.template = "vicuna_v1"
  assert trainer.model_config(config).template == "vicuna_v1"


def test_infer_refuses_an_unknown_template():
  run = subprocess.run([sys.executable, "infer.py", "--config.template=nope"],
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 1
  assert run.stderr.strip().startswith("infer.py: unknown chat template 'nope'; choose one of")
  faults.record("infer.py", "--config.template=nope", run.stderr, before="weights load")
