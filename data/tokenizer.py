"""The project's special tokens and loading a trained tokenizer.

Special tokens sit at the start of the vocabulary in the fixed order of SPECIAL_TOKENS, so
their ids are the same constants in every tokenizer the project trains; load_tokenizer checks
that a file keeps to this.
"""

from pathlib import Path

from tokenizers import Tokenizer

PAD = "<|pad|>"
BOS = "<|bos|>"
EOS = "<|eos|>"
NUM_PREDICTOR_TOKENS = 8
IMAGE = "<|image|>"
IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"


def predictor_token(i: int) -> str:
    """The JEPA predictor token for prediction step i, counted from 1 like the token names."""
    if not 1 <= i <= NUM_PREDICTOR_TOKENS:
        raise ValueError(f"predictor token index {i} is outside 1..{NUM_PREDICTOR_TOKENS}")
    return f"<|predictor_{i}|>"


SPECIAL_TOKENS = (
    PAD,
    BOS,
    EOS,
    *(predictor_token(i) for i in range(1, NUM_PREDICTOR_TOKENS + 1)),
    IMAGE,
    IMAGE_START,
    IMAGE_END,
    SYSTEM,
    USER,
    ASSISTANT,
    END,
)


def special_id(token: str) -> int:
    """The fixed id of a special token (its position in SPECIAL_TOKENS)."""
    try:
        return SPECIAL_TOKENS.index(token)
    except ValueError:
        raise ValueError(f"{token!r} is not one of the special tokens {SPECIAL_TOKENS}") from None


PAD_ID = special_id(PAD)
BOS_ID = special_id(BOS)
EOS_ID = special_id(EOS)
IGNORE = -100  # PyTorch's default ignore_index: labels the LM loss skips


def predictor_token_id(i: int) -> int:
    return special_id(predictor_token(i))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, checking that the special tokens have their fixed ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (train one with tools/train_tokenizer.py)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"tokenizer file {path} is not a valid tokenizers JSON file: {e}") from e
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        actual = tokenizer.token_to_id(token)
        if actual != expected_id:
            raise ValueError(
                f"tokenizer file {path}: special token {token} has id {actual}, expected {expected_id}; "
                "it was not trained by tools/train_tokenizer.py with the current special tokens"
            )
    return tokenizer


def load_hf_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from a local model directory, with the eight predictor tokens added
    (all of them, whatever a run uses, so checkpoints stay interchangeable) and a pad token."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model.hf.path {str(path)!r} is not a local directory (no model hub here)")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.add_tokens([predictor_token(i) for i in range(1, NUM_PREDICTOR_TOKENS + 1)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
