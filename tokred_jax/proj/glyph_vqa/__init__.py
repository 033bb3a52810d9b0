"""glyph_vqa: the project's own visual-QA data set and the recipe of its default model
(the tower pretraining; the LLM stages are configs/glyph_llava.py)."""
