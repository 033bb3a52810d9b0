"""Chat templates: how a conversation becomes the text and token ids a model expects.

A conversation is an optional system prompt and (question, answer) turns; the question
that shows the image holds the placeholder `<image>`, which the model's tokenizer reads
as one token and `processing.expand_image_token` widens into the visual-token slots.
A template renders it two ways:

- for inference, `prompt`: earlier turns, then the question and the assistant prefix
  the model continues from;
- for training, `conversation` and `training_ids`: every turn answered, and which tokens
  are targets: each reply and the separator that ends it (EOS or `<|im_end|>`), so the
  model learns to stop; the instructions, system prompt and image slots are not.

  name       one question renders as                                  history reply
  tokred     "USER: <image>\\nQ ASSISTANT:"                             " A</s>"
  llava-hf   "USER: <image>\\nQ ASSISTANT:"                             " A "
  vicuna_v1  "{SYSTEM} USER: <image>\\nQ ASSISTANT:"                    " A</s>"
  llava_v1   vicuna_v1 with its "curious human" system prompt
  qwen       "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
             <image>\\nQ<|im_end|>\\n<|im_start|>assistant\\n"           "A<|im_end|>\\n"

`vicuna_v1` and `llava_v1` are the original LLaVA-1.5's `conv_vicuna_v1` (what LLaVA-1.5
and p-MoD train and evaluate with) and `conv_llava_v1`; `qwen` is LLaVA-OneVision's
`qwen_1_5` (ChatML); all three tokenize the text chunk by chunk around `<image>`, BOS
kept only on the first chunk, as LLaVA's `tokenizer_image_token` does. `llava-hf` is the
chat template llava-hf ships with llava-1.5-*-hf (no system prompt; an answer in the
history is followed by a space, not EOS; training closes each answer with EOS, which the
chat template leaves out), tokenized as one text as LlavaProcessor does. `tokred` is the
format the embedded models (tokred_jax/assets) were trained with: vicuna_v1's turns
without a system prompt, tokenized as one text.

Targets are the tokens that start inside a reply's span of the text (the space before
the answer where the format has one, the answer, its end separator), found from the
tokenizer's character offsets, so they agree with how the text is tokenized.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

IMAGE_TOKEN = "<image>"
EOS = "{eos}"  # In `Template.end`: the tokenizer's EOS token.
_DEFAULT = object()  # `system` argument not given: the template's own.
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's "
                "questions.")
QWEN_SYSTEM = "You are a helpful assistant."


@dataclasses.dataclass(frozen=True)
class Template:
  """One conversation format.

  Attributes:
    name: the name `get` takes.
    system: the system prompt used when none is given (None: no system turn).
    system_turn: how a system prompt renders ("{system}"); None: the format has none.
    user_turn: how a question renders ("{question}").
    assistant: the assistant prefix a reply follows (where inference stops).
    reply: how an answer renders after `assistant` ("{answer}").
    end: what closes a reply in training, a single token; EOS: the tokenizer's.
    history_end: what closes an earlier reply in an inference prompt.
    after: text between a closed reply and the next turn (never a target).
    split_at_image: tokenize the text chunk by chunk around `<image>`, as the original
      LLaVA's `tokenizer_image_token` does, instead of as one text.
    skip_empty_system: an empty system prompt renders nothing (ChatML), not `system_turn`.
    specials: strings of the format that must be single tokens of the tokenizer.
  """
  name: str
  system: str | None
  system_turn: str | None
  user_turn: str
  assistant: str
  reply: str
  end: str
  history_end: str
  after: str = ""
  split_at_image: bool = False
  skip_empty_system: bool = False
  specials: tuple[str, ...] = ()

  def _system(self, system: Any) -> str:
    system = self.system if system is _DEFAULT else system
    if system is None or (self.skip_empty_system and not system):
      return ""
    if self.system_turn is None:
      raise ValueError(f"the {self.name} template has no system prompt; leave system "
                       "unset or choose a template that has one (e.g. vicuna_v1).")
    return self.system_turn.format(system=system)

  def prompt(self, question: str, history: Sequence[tuple[str, str]] = (),
             system: Any = _DEFAULT, eos: str = "</s>") -> str:
    """The inference text: `history` (answered turns), then `question` and the assistant
    prefix. A question that holds `<image>` keeps it where it is; if no turn holds one,
    the image goes first in the first question, on its own line. `eos`: the
    tokenizer's EOS string, which closes earlier replies in some templates."""
    question = question.strip()
    if not question:
      raise ValueError("the question is empty; ask something about the image.")
    questions = [q for q, _ in history] + [question]
    if not any(IMAGE_TOKEN in q for q in questions):
      questions[0] = f"{IMAGE_TOKEN}\n{questions[0].strip()}"
    text, end = self._system(system), self.history_end.replace(EOS, eos)
    for q, (_, answer) in zip(questions, history):
      text += (self.user_turn.format(question=q) + self.assistant
               + self.reply.format(answer=answer) + end + self.after)
    return text + self.user_turn.format(question=questions[-1]) + self.assistant

  def conversation(self, pairs: Sequence[tuple[str, str]], eos: str,
                   system: Any = _DEFAULT) -> tuple[str, list[tuple[int, int]]]:
    """The training text of (question, answer) `pairs` (questions as given, `<image>`
    included) and the character span [start, end) of each reply with its end separator.
    `eos` is the tokenizer's EOS string, for a template whose `end` is EOS."""
    end = self.end.replace(EOS, eos)
    text, spans = self._system(system), []
    for question, answer in pairs:
      text += self.user_turn.format(question=question) + self.assistant
      start = len(text)
      text += self.reply.format(answer=answer) + end
      spans.append((start, len(text)))
      text += self.after
    return text, spans

  def encode(self, tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` and each token's character span in it ((0, 0) for BOS),
    BOS first when the model has one. `tokenizer`: a `processing.Tokenizer`."""
    if not self.split_at_image:
      return tokenizer.encode_with_offsets(text)
    ids, offsets, at = [], [], 0
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
      if i:
        ids.append(tokenizer.image_token_id)
        offsets.append((at, at + len(IMAGE_TOKEN)))
        at += len(IMAGE_TOKEN)
      chunk_ids, chunk_offsets = tokenizer.encode_with_offsets(chunk)
      if i and tokenizer.bos_id is not None:  # BOS only once, at the very start.
        chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
      ids += chunk_ids
      offsets += [(a + at, b + at) for a, b in chunk_offsets]  # BOS keeps (0, 0): at = 0.
      at += len(chunk)
    return ids, offsets

  def end_token(self, tokenizer) -> int:
    """The id of the token that closes a reply."""
    if self.end == EOS:
      if not tokenizer.eos_ids:
        raise ValueError("the model has no EOS token; replies need one to end with.")
      return tokenizer.eos_ids[0]
    self.check_tokenizer(tokenizer)
    return tokenizer.token_id(self.end)

  def check_tokenizer(self, tokenizer) -> None:
    """Raises ValueError if a special string of the template is not one token of
    `tokenizer` (it would be read as plain text)."""
    for special in self.specials:
      if tokenizer.token_id(special) is None:
        raise ValueError(f"the tokenizer has no {special} token, which the {self.name} "
                         "template needs; choose the template the model was trained "
                         f"with (known: {', '.join(TEMPLATES)}).")

  def training_ids(self, tokenizer, pairs: Sequence[tuple[str, str]],
                   system: Any = _DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a training conversation and which of them are targets.

    Returns:
      ids: i32[L], BOS first when the model has one, one image token (not expanded).
      target: bool[L], True on each reply's tokens and its end separator.
    """
    end_id = self.end_token(tokenizer)
    eos = tokenizer.token(tokenizer.eos_ids[0]) if tokenizer.eos_ids else ""
    text, spans = self.conversation(pairs, eos, system)
    ids, offsets = self.encode(tokenizer, text)
    starts = np.array([start for start, _ in offsets])
    target = np.zeros(len(ids), bool)
    for begin, end in spans:
      inside = (starts >= begin) & (starts < end)
      if not inside.any() or ids[np.flatnonzero(inside)[-1]] != end_id:
        raise ValueError(f"the tokenizer does not read {tokenizer.token(end_id)!r} as one "
                         f"token (id {end_id}); it must be a special token of "
                         "tokenizer.json.")
      target |= inside
    return np.asarray(ids, np.int32), target


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("tokred", system=None, system_turn=None, user_turn="USER: {question} ",
             assistant="ASSISTANT:", reply=" {answer}", end=EOS, history_end=EOS),
    Template("llava-hf", system=None, system_turn="{system} ", user_turn="USER: {question} ",
             assistant="ASSISTANT:", reply=" {answer}", end=EOS, history_end="", after=" "),
    Template("vicuna_v1", system=VICUNA_SYSTEM, system_turn="{system} ",
             user_turn="USER: {question} ", assistant="ASSISTANT:", reply=" {answer}",
             end=EOS, history_end=EOS, split_at_image=True),
    Template("llava_v1", system=LLAVA_SYSTEM, system_turn="{system} ",
             user_turn="USER: {question} ", assistant="ASSISTANT:", reply=" {answer}",
             end=EOS, history_end=EOS, split_at_image=True),
    Template("qwen", system=QWEN_SYSTEM, system_turn="<|im_start|>system\n{system}<|im_end|>\n",
             user_turn="<|im_start|>user\n{question}<|im_end|>\n",
             assistant="<|im_start|>assistant\n", reply="{answer}", end="<|im_end|>",
             history_end="<|im_end|>", after="\n", split_at_image=True,
             skip_empty_system=True, specials=("<|im_start|>", "<|im_end|>")),
)}


def get(name: str | Template) -> Template:
  """The template called `name` (a `Template` passes through)."""
  if isinstance(name, Template):
    return name
  if name not in TEMPLATES:
    raise ValueError(f"unknown chat template {name!r}; choose one of "
                     f"{', '.join(TEMPLATES)}.")
  return TEMPLATES[name]


def default_name(text_kind: str, has_chat_template: bool) -> str:
  """The template of a Hugging Face checkpoint that does not record one: Qwen's for a
  Qwen2 LLM, llava-hf's when the checkpoint ships a chat template, else `tokred` (the
  embedded models and those this library trained before templates were recorded)."""
  if text_kind == "qwen2":
    return "qwen"
  return "llava-hf" if has_chat_template else "tokred"
