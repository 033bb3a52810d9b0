"""The glyph_vqa project: the recipe of the default model trained on the project's own
data set (tokred_jax/data/glyph_vqa.py). Stage 1, the tower pretraining, is here; the
LLM stages are configs/glyph_llava.py; tools/train_default_model.sh runs them all."""
