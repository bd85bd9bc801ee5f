"""Is a Hugging Face model directory loadable? Checked before transformers reads it.

transformers answers a corrupt `config.json`, missing tokenizer files or a truncated
`model.safetensors` (a copy or download cut short) with a deep traceback that rarely names
the file. These checks read only file headers and small JSON files (a 7B model's weights are
memory-mapped, not read), so they cost milliseconds, and each failure names the file and the
fix.
"""

from __future__ import annotations

import json
from pathlib import Path

# Any one of these lets AutoTokenizer build a tokenizer (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_RESAVE = "re-save the model with save_pretrained() or copy the directory again"


class ModelFilesError(FileNotFoundError, ValueError):
    """A model directory transformers cannot load. A FileNotFoundError for callers that catch
    missing files, a ValueError for callers that catch bad input; the message names the file."""


def _json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ModelFilesError(f"{path}: cannot read the {what} ({e.strerror or e}); {_RESAVE}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFilesError(f"{path}: the {what} is not valid JSON ({e}); {_RESAVE}") from None
    if not isinstance(data, dict):
        raise ModelFilesError(f"{path}: the {what} must be a JSON object, got {type(data).__name__}; {_RESAVE}")
    return data


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise ModelFilesError(f"{path}: weight file missing; {_RESAVE}")
    try:
        with safe_open(str(path), framework="pt"):  # validates the header against the file's length
            pass
    except Exception as e:  # SafetensorError derives from Exception only
        raise ModelFilesError(f"{path}: unreadable safetensors weights ({e}); the file is truncated or "
                              f"corrupt: {_RESAVE}") from None


def check_model_dir(path: str | Path, field: str = "model.path") -> None:
    """Raise ModelFilesError naming `field`, the file and the fix unless `path` holds a readable
    config, tokenizer and weights."""
    root = Path(path)
    where = f"{field}={str(path)!r}"
    if not root.is_dir():
        raise ModelFilesError(f"{where}: no model directory there; expected a Hugging Face model directory "
                              "(config.json, tokenizer, weights)")
    if not (root / "config.json").is_file():
        raise ModelFilesError(f"{where}: no config.json there; expected a Hugging Face model directory")
    try:
        config = _json_object(root / "config.json", "model config")
        if not isinstance(config.get("model_type"), str) or not config["model_type"]:
            raise ModelFilesError(f"{root / 'config.json'}: no 'model_type' string, so transformers cannot tell the "
                                  f"architecture; {_RESAVE}")
        for name in ("tokenizer_config.json", "generation_config.json", "tokenizer.json"):
            if (root / name).exists():
                _json_object(root / name, name.removesuffix(".json").replace("_", " "))
        if not any((root / name).is_file() for name in TOKENIZER_FILES):
            raise ModelFilesError(f"{root}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); save the "
                                  "tokenizer beside the model with tokenizer.save_pretrained()")
        weights = [name for name in WEIGHT_FILES if (root / name).is_file()]
        if not weights:
            raise ModelFilesError(f"{root}: no weights (none of {', '.join(WEIGHT_FILES)}); {_RESAVE}")
        if "model.safetensors" in weights:
            _check_safetensors(root / "model.safetensors")
        elif "model.safetensors.index.json" in weights:
            index = _json_object(root / "model.safetensors.index.json", "safetensors index")
            shards = index.get("weight_map")
            if not isinstance(shards, dict) or not shards:
                raise ModelFilesError(f"{root / 'model.safetensors.index.json'}: no 'weight_map'; {_RESAVE}")
            for shard in sorted(set(map(str, shards.values()))):
                _check_safetensors(root / shard)
        elif (root / weights[0]).stat().st_size == 0:
            raise ModelFilesError(f"{root / weights[0]}: empty weight file; {_RESAVE}")
    except ModelFilesError as e:
        raise ModelFilesError(f"{where}: {e}") from None
