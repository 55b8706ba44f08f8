import sys
from pathlib import Path

# tests/train/tiny.py: the offline tiny model, tokenizer and data builders
sys.path.insert(0, str(Path(__file__).resolve().parent))
