"""TinyBERT-style data augmentation of SQuAD training questions, cached on disk with its recipe.

Each augmented copy of a question replaces whole words, each with probability `p_question`
in the question and `p_context` in the context, by one of the `neighbours` nearest words in
the teacher's own input-embedding space (cosine, whole-word vocabulary entries only; TinyBERT
uses a masked LM for single-piece words and GloVe neighbours for the rest, and a sentence
encoder such as all-MiniLM has no masked-LM head). Context words inside the answer span are
never touched, so the answer text stays the same and its new character offset is tracked:
the hard label stays valid, and the teacher labels every copy with its own soft predictions
(teacher_cache.py). Question words (what, who, ...) are kept so a question still asks for the
same kind of answer.

The output folder holds `recipe.json` (the settings, the teacher's digest and the training
file's digest) and `shard-NNNNN.jsonl` files, one per `shard_size` source questions, each
written to a temporary name and renamed when complete: an interrupted run resumes at the
first missing shard, and a shard's content depends only on the recipe and its index.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import CanaoError
from ..tasks.squad import Example
from ..fileio import atomic_write_text, file_digest

WORD = re.compile(r"[A-Za-z]+")
# Kept as they are: question words (a question keeps asking for the same kind of answer) and
# function words (their embedding neighbours are other function words: "the" -> "is" only breaks
# the grammar). Neither is a replacement either.
KEEP = frozenset("""what who whom whose when where why how which not no nor a an the this that these those is are was
were be been being am do does did has have had having of in on at by for with from to into onto over under about
as than then and or but if so because while during before after since until of off up down out it its they them
their he him his she her we us our you your i me my there here also very such same other only just can could will
would shall should may might must""".split())


@dataclass(frozen=True)
class AugmentRecipe:
    copies: int = 10  # augmented copies per training question (the originals are kept besides)
    p_question: float = 0.3
    p_context: float = 0.3
    neighbours: int = 12
    seed: int = 0
    shard_size: int = 500  # source questions per shard file
    method: str = "embedding-neighbours"

    def __post_init__(self):
        if self.copies < 1:
            raise CanaoError("augmentation: copies must be at least 1")
        if not (0 <= self.p_question <= 1 and 0 <= self.p_context <= 1):
            raise CanaoError("augmentation: replacement probabilities must be between 0 and 1")
        if self.neighbours < 1:
            raise CanaoError("augmentation: neighbours must be at least 1")


def neighbour_table(word_embeddings: np.ndarray, vocab: dict[str, int], k: int,
                    queries: set[str] | None = None) -> dict[str, list[str]]:
    """{word: its k nearest whole words} over the alphabetic, whole-word vocabulary entries, by cosine
    similarity of the input embeddings; for the words in `queries` only, when given (a word's
    neighbours do not depend on which other words are asked for)."""
    words = sorted((w for w in vocab if w.isalpha() and w.isascii() and len(w) > 1 and w not in KEEP),
                   key=vocab.__getitem__)
    if len(words) <= k:
        raise CanaoError(f"augmentation: the vocabulary has only {len(words)} whole words; need more than {k}")
    emb = np.asarray(word_embeddings, np.float32)[[vocab[w] for w in words]]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-6)
    rows = [i for i, w in enumerate(words) if queries is None or w in queries]
    table = {}
    for lo in range(0, len(rows), 2048):  # blocks of rows keep the similarity matrix small
        block = rows[lo:lo + 2048]
        sim = emb[block] @ emb.T
        sim[np.arange(len(block)), block] = -np.inf  # not itself
        top = np.argpartition(-sim, k, axis=1)[:, :k]
        for r, i in enumerate(block):
            order = top[r][np.argsort(-sim[r, top[r]])]
            table[words[i]] = [words[j] for j in order]
    return table


def _words(examples: list[Example]) -> set[str]:
    return {m.group().lower() for ex in examples for text in (ex.question, ex.context) for m in WORD.finditer(text)}


def _replace(text: str, table: dict[str, list[str]], p: float, rng: np.random.Generator,
             protect: tuple[int, int] | None = None, keep: set[str] = frozenset()) -> tuple[str, int]:
    """`text` with words replaced; returns (new text, shift of the protected span's start)."""
    out, last, shift = [], 0, 0
    for m in WORD.finditer(text):
        word = m.group()
        low = word.lower()
        if protect and m.end() > protect[0] and m.start() < protect[1]:
            continue  # inside (or touching) the answer
        if low in keep or low not in table or rng.random() >= p:
            continue
        new = table[low][int(rng.integers(len(table[low])))]
        if word[0].isupper():
            new = new.upper() if word.isupper() and len(word) > 1 else new.capitalize()
        out.append(text[last:m.start()])
        out.append(new)
        last = m.end()
        if protect and m.end() <= protect[0]:
            shift += len(new) - len(word)
    out.append(text[last:])
    return "".join(out), shift


def augment_example(ex: Example, table: dict[str, list[str]], rng: np.random.Generator, recipe: AugmentRecipe,
                    copy: int) -> Example:
    """One augmented copy: the first gold answer's span is kept verbatim and re-located."""
    a = ex.answer_starts[0]
    b = a + len(ex.answers[0])
    question, _ = _replace(ex.question, table, recipe.p_question, rng, keep=KEEP)
    context, shift = _replace(ex.context, table, recipe.p_context, rng, protect=(a, b), keep=KEEP)
    start = a + shift
    if context[start:start + len(ex.answers[0])] != ex.answers[0]:  # cannot happen unless the span was mislabelled
        context, start = ex.context, a
    return Example(f"{ex.qid}#aug{copy}", question, context, [ex.answers[0]], [start])


class Augmented:
    """The augmented set in `folder`: build (resumably) and read."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def recipe(self) -> dict | None:
        path = self.folder / "recipe.json"
        return json.loads(path.read_text()) if path.exists() else None

    def build(self, examples: list[Example], train_digest: str, teacher_digest: str, word_embeddings, vocab,
              recipe: AugmentRecipe = AugmentRecipe(), progress: bool = True) -> dict:
        """Write every shard that is missing; a folder built with another recipe is refused."""
        from tqdm import tqdm

        want = {**asdict(recipe), "train_digest": train_digest, "teacher_digest": teacher_digest,
                "source_questions": len(examples)}
        have = self.recipe()
        if have is not None and {k: v for k, v in have.items() if k != "complete"} != want:
            raise CanaoError(f"{self.folder} holds augmented data made with another recipe or teacher; "
                             "remove it or choose another folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        if have is None:
            atomic_write_text(self.folder / "recipe.json", json.dumps(want, indent=1))
        n_shards = (len(examples) + recipe.shard_size - 1) // recipe.shard_size
        missing = [s for s in range(n_shards) if not self._shard(s).exists()]
        todo = [ex for s in missing for ex in examples[s * recipe.shard_size:(s + 1) * recipe.shard_size]]
        table = neighbour_table(word_embeddings, vocab, recipe.neighbours, _words(todo)) if missing else None
        for s in tqdm(missing, desc="augment", unit="shard", disable=not progress):
            rng = np.random.default_rng([recipe.seed, s])  # a shard depends on its index only
            lines = []
            for ex in examples[s * recipe.shard_size:(s + 1) * recipe.shard_size]:
                for c in range(recipe.copies):
                    aug = augment_example(ex, table, rng, recipe, c)
                    lines.append(json.dumps({"id": aug.qid, "question": aug.question, "context": aug.context,
                                             "answer": aug.answers[0], "answer_start": aug.answer_starts[0]}))
            atomic_write_text(self._shard(s), "\n".join(lines) + "\n")
        atomic_write_text(self.folder / "recipe.json", json.dumps({**want, "complete": True}, indent=1))
        return {"folder": str(self.folder), "shards": n_shards, "built_now": len(missing),
                "questions": len(examples) * recipe.copies}

    def _shard(self, s: int) -> Path:
        return self.folder / f"shard-{s:05d}.jsonl"

    def examples(self) -> list[Example]:
        rec = self.recipe()
        if not rec or not rec.get("complete"):
            raise CanaoError(f"{self.folder}: augmentation incomplete; run it again to finish (it resumes)")
        out = []
        for path in sorted(self.folder.glob("shard-*.jsonl")):
            for line in path.read_text().splitlines():
                d = json.loads(line)
                out.append(Example(d["id"], d["question"], d["context"], [d["answer"]], [int(d["answer_start"])]))
        return out

    def digest(self) -> str:
        rec = self.recipe() or {}
        return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


def augment_from_teacher(teacher_dir: str | Path, train_file: str | Path, folder: str | Path,
                         recipe: AugmentRecipe = AugmentRecipe(), limit: int | None = None, progress: bool = True) -> dict:
    """Augment the training questions of `train_file` with the teacher's embedding neighbours."""
    from safetensors import safe_open

    from ..models.checkpoint import weight_files
    from ..models.wordpiece import load_wordpiece
    from ..tasks import squad

    examples = squad.read_squad(train_file, limit)
    tok = load_wordpiece(teacher_dir)
    emb = None
    for path in weight_files(Path(teacher_dir)):
        with safe_open(str(path), "np") as f:
            for name in f.keys():
                if name.endswith("embeddings.word_embeddings.weight"):
                    emb = f.get_tensor(name)
    if emb is None:
        raise CanaoError(f"{teacher_dir}: no word-embedding table found (expected *.embeddings.word_embeddings.weight)")
    return Augmented(folder).build(examples, file_digest(train_file), teacher_digest(teacher_dir), emb,
                                   tok.get_vocab(), recipe, progress)


def teacher_digest(folder: str | Path) -> str:
    """A checksum of a checkpoint folder's config and weights: what caches of its outputs are keyed by."""
    from ..models.checkpoint import weight_files

    folder = Path(folder)
    h = hashlib.sha256()
    for path in [folder / "config.json", *weight_files(folder)]:
        h.update(path.name.encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()[:16]
