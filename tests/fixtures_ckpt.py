"""Session-scoped pytest fixtures: the tiny Hugging Face checkpoints of `hf_fixtures`.

Register with `pytest_plugins = ["tests.fixtures_ckpt"]` in the top-level conftest.py.
Each checkpoint is built once per session; tests that modify one copy it first.
"""

import pytest

from tests import hf_fixtures


@pytest.fixture(scope="session")
def clip_llama_dir(tmp_path_factory):
  """CLIP + Llama (GQA) checkpoint as transformers 5 saves it."""
  return hf_fixtures.make_clip_llama(tmp_path_factory.mktemp("clip_llama"))


@pytest.fixture(scope="session")
def siglip_qwen2_dir(tmp_path_factory):
  """SigLIP + Qwen2 (q/k/v bias, tied embeddings) checkpoint as transformers 5 saves it."""
  return hf_fixtures.make_siglip_qwen2(tmp_path_factory.mktemp("siglip_qwen2"))


@pytest.fixture(scope="session")
def published_dir(tmp_path_factory):
  """CLIP + Llama checkpoint in the published llava-hf layout, with a sparse config."""
  return hf_fixtures.make_published_layout(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="session")
def llava_next_dir(tmp_path_factory):
  """LLaVA-NeXT (anyres CLIP + Llama) checkpoint as transformers 5 saves it."""
  return hf_fixtures.make_llava_next(tmp_path_factory.mktemp("llava_next"))


@pytest.fixture(scope="session")
def llava_onevision_dir(tmp_path_factory):
  """LLaVA-OneVision (anyres_max_9 SigLIP + Qwen2) checkpoint as transformers 5 saves it."""
  return hf_fixtures.make_llava_onevision(tmp_path_factory.mktemp("llava_onevision"))
