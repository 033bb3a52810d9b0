"""LLaVA-1.5 conversations as training sequences: turn checks, template, tokens, targets.

A conversation in the llava_v1_5_mix665k format is a list of turns
`{"from": "human" | "gpt", "value": text}`, alternating and starting with "human", one
`<image>` in the human turns. As LLaVA's training code does, the `<image>` tag moves to
the front of the turn that holds it. The turns are rendered with the model's chat
template (tokred_jax.io.templates; `LlavaConfig.template` unless one is chosen), the one
its prompts at inference are written in; with "tokred", the embedded models' format:

  "USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"

The model learns the replies: every token that starts inside a reply (" {answer}</s>"
here) is a target, its end separator included, so that the model learns to stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tokred_jax.data.skips import MALFORMED, NO_ASSISTANT_TURN, TOO_LONG, BadSample
from tokred_jax.io import processing, templates
from tokred_jax.models.config import LlavaConfig

HUMAN, GPT = "human", "gpt"
IMAGE_TOKEN = processing.IMAGE_TOKEN


def parse_turns(sample_id: str, conversations: Any) -> list[tuple[str, str]]:
  """Checks a conversation and returns its (question, answer) pairs.

  Args:
    sample_id: the sample's id, for error messages.
    conversations: the sample's "conversations" list.

  Returns:
    The pairs in order; the question holding the image starts with "<image>\\n" (the
    first question gets the tag when no turn has one, as `build_prompt` does).

  Raises:
    BadSample: "no assistant turn" when no turn is from "gpt"; "malformed
      conversation" when turns are not dicts of strings, do not alternate human/gpt
      starting with human, end on a question, or hold more than one `<image>`.
  """
  def bad(reason: str, detail: str) -> BadSample:
    return BadSample(sample_id, reason, detail)

  if not isinstance(conversations, Sequence) or isinstance(conversations, str):
    raise bad(MALFORMED, f"'conversations' is a {type(conversations).__name__}, not a list")
  turns = []
  for i, turn in enumerate(conversations):
    if (not isinstance(turn, Mapping) or not isinstance(turn.get("from"), str)
        or not isinstance(turn.get("value"), str)):
      raise bad(MALFORMED, f"turn {i} is not a {{'from': str, 'value': str}} dict")
    turns.append((turn["from"], turn["value"]))
  if not any(role == GPT for role, _ in turns):
    raise bad(NO_ASSISTANT_TURN, f"none of its {len(turns)} turns is from {GPT!r}")
  for i, (role, _) in enumerate(turns):
    want = HUMAN if i % 2 == 0 else GPT
    if role != want:
      raise bad(MALFORMED, f"turn {i} is from {role!r} but {want!r} was expected (turns "
                "alternate human, gpt, starting with human)")
  if len(turns) % 2:
    raise bad(MALFORMED, "the last turn is a question with no answer")
  if any(IMAGE_TOKEN in text for role, text in turns if role == GPT):
    raise bad(MALFORMED, f"an answer holds {IMAGE_TOKEN}")
  pairs = [(q, a) for (_, q), (_, a) in zip(turns[::2], turns[1::2])]
  count = sum(q.count(IMAGE_TOKEN) for q, _ in pairs)
  if count > 1:
    raise bad(MALFORMED, f"it holds {count} {IMAGE_TOKEN} tags; LLaVA-1.5 takes one image")
  at = next((i for i, (q, _) in enumerate(pairs) if IMAGE_TOKEN in q), 0)
  question = pairs[at][0].replace(IMAGE_TOKEN, "").strip()
  pairs[at] = (f"{IMAGE_TOKEN}\n{question}", pairs[at][1])
  return pairs


def tokenize_conversation(tokenizer: processing.Tokenizer, pairs: Sequence[tuple[str, str]],
                          image_token_id: int, num_image_tokens: int,
                          template: str | templates.Template = "tokred"
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of a conversation and which of them the model learns to produce.

  Args:
    tokenizer: the checkpoint's tokenizer.
    pairs: (question, answer) pairs from `parse_turns`.
    image_token_id: the id of `<image>` in the tokenizer.
    num_image_tokens: image slots the single `<image>` expands into.
    template: the chat template (a name from tokred_jax.io.templates).

  Returns:
    ids: i32[L], BOS first when the model has one, the image slots expanded.
    target: bool[L], True on the reply tokens (answers and their end separator).
  """
  ids, target = templates.get(template).training_ids(tokenizer, pairs)
  ids, at = processing.expand_image_token(ids, image_token_id, num_image_tokens)
  target = np.concatenate([target[:at], np.zeros(num_image_tokens, bool), target[at + 1:]])
  return np.asarray(ids, np.int32), target


def encode_example(tokenizer: processing.Tokenizer, cfg: LlavaConfig, sample_id: str,
                   conversations: Any, max_length: int,
                   num_image_tokens: int | None = None,
                   template: str | templates.Template | None = None
                   ) -> dict[str, np.ndarray]:
  """One conversation as right-padded training arrays of length T = `max_length`.

  Args:
    tokenizer: the checkpoint's tokenizer.
    cfg: the model config (image token id).
    sample_id: the sample's id, for error messages.
    conversations: the sample's turns, as in the JSON.
    max_length: T.
    num_image_tokens: image slots in the sequence: the reduction plan's `num_visual`
      (pre-LLM merging or pooling leaves fewer); None: `cfg.num_image_tokens`.
    template: the chat template; None: the model's (`cfg.template`, else "tokred").

  Returns:
    input_ids: i32[T], the pad id after the sequence.
    attention_mask: bool[T], False on padding.
    positions: i32[T], 0, 1, ... over the sequence (cumsum(mask) - 1, at least 0).
    labels: i32[T], the next token id at each position; the pad id where there is none.
    loss_mask: bool[T], True where labels[t] is a reply token.

  Raises:
    BadSample: for a malformed conversation, or "too long" when the tokens (image
      slots included) exceed `max_length`.
  """
  if num_image_tokens is None:
    num_image_tokens = cfg.num_image_tokens
  pairs = parse_turns(sample_id, conversations)
  ids, target = tokenize_conversation(tokenizer, pairs, cfg.image_token_id, num_image_tokens,
                                     template or cfg.template or "tokred")
  length = len(ids)
  if length > max_length:
    raise BadSample(sample_id, TOO_LONG,
                    f"{length} tokens ({num_image_tokens} of them image slots) exceed "
                    f"max_length {max_length}")
  input_ids = np.full(max_length, tokenizer.pad_id, np.int32)
  input_ids[:length] = ids
  mask = np.arange(max_length) < length
  labels = np.full(max_length, tokenizer.pad_id, np.int32)
  labels[:length - 1] = ids[1:]
  loss_mask = np.zeros(max_length, bool)
  loss_mask[:length - 1] = target[1:]
  positions = np.maximum(np.cumsum(mask, dtype=np.int32) - 1, 0)
  return dict(input_ids=input_ids, attention_mask=mask, positions=positions,
              labels=labels, loss_mask=loss_mask)
