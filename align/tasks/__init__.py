"""Pipeline tasks: prompts, demonstrations and a hidden gold scorer (see align/pipeline.py)."""
