"""The data stage: a recipe's data section turned into a prepared dataset (tokenizer, shards,
manifest with hashes) once, before any training process reads it.

Only ``data.corpus`` needs the stage (a dataset directory or indexed prefixes are prepared
already). ``slowqk train`` runs it first, ``slowqk prepare-data RECIPE`` runs it alone, and a
grid's data job runs it once for all the grid's runs. Training opens the prepared dataset and
never tokenizes: it refuses a corpus whose preparation is missing or was made from other inputs.

Several processes may run the stage at once (every rank of a job, every task of an array): an
exclusive lock on the preparation directory lets the first one prepare while the others wait and
then find it done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from slowqk.config import DataConfig, Recipe
from slowqk.data.corpus import prepare_corpus, read_corpus
from slowqk.hashing import file_sha256

RECORD = "stage.json"  # what the preparation was made from (read by the training side)


def needs_stage(data: DataConfig) -> bool:
    return data.corpus is not None


def stage_inputs(data: DataConfig) -> dict:
    """What a preparation is made from: equal inputs give the same dataset."""
    return {
        "corpus": str(Path(data.corpus).resolve()),
        "valid_fraction": data.valid_fraction,
        "vocab_size": data.tokenizer_vocab_size,
        "tokenizer": str(Path(data.tokenizer).resolve()) if data.tokenizer else None,
    }


def stage_dir(recipe: Recipe) -> Path:
    """Where a single run's corpus is prepared (and where its training looks for it)."""
    return recipe.run_dir / "data"


@contextlib.contextmanager
def _exclusive(where: Path) -> Iterator[None]:
    where.mkdir(parents=True, exist_ok=True)
    with open(where / ".stage.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except OSError as exc:  # e.g. Lustre mounted without flock
            raise OSError(
                f"{where}: cannot lock this folder ({exc.strerror}); prepare the data once first "
                "(`slowqk prepare-data RECIPE`), then start the ranks"
            ) from None
        yield


def _corpus_stat(corpus: str) -> list[int]:
    st = Path(corpus).stat()
    return [st.st_size, st.st_mtime_ns]


def _read_record(where: Path) -> dict | None:
    try:
        return json.loads((where / RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def prepare_stage(data: DataConfig, where: Path, progress: bool = False) -> Path:
    """Prepare ``data``'s corpus into ``where`` (reused when its inputs are unchanged); the
    dataset directory."""
    inputs = stage_inputs(data)
    if not Path(inputs["corpus"]).is_file():
        raise FileNotFoundError(f"data.corpus={data.corpus}: corpus file not found")

    def done() -> Path | None:  # the record is written last: one that matches is complete
        record = _read_record(where)
        if record is None:
            return None
        if record["inputs"] != inputs:  # a run's data are never replaced under it
            raise ValueError(
                f"data.corpus={data.corpus}: {where} holds a preparation from other inputs "
                f"({record['inputs']}); use another out_dir, or remove {where} to prepare again"
            )
        touched = record["corpus_stat"] != _corpus_stat(inputs["corpus"])
        if touched and record.get("corpus_sha256") != file_sha256(inputs["corpus"]):
            raise ValueError(
                f"data.corpus={data.corpus}: the file changed since it was prepared in {where}, "
                f"which runs may be reading; use another out_dir, or remove {where} to prepare "
                "again"
            )
        return where / record["dataset"]

    if (dataset := done()) is not None:
        return dataset  # prepared by an earlier process: nothing to do
    read_corpus(Path(inputs["corpus"]))  # a bad corpus is refused before anything is written
    with _exclusive(where):
        if (dataset := done()) is not None:
            return dataset  # prepared while this process waited for the lock
        stat, sha = _corpus_stat(inputs["corpus"]), file_sha256(inputs["corpus"])
        prepared = prepare_corpus(
            inputs["corpus"],
            where,
            valid_fraction=data.valid_fraction,
            vocab_size=data.tokenizer_vocab_size,
            tokenizer=inputs["tokenizer"],
            progress=progress,
        )
        dataset = prepared.dataset_dir.relative_to(where)
        tmp = where / (RECORD + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "inputs": inputs,
                    "corpus_stat": stat,
                    "corpus_sha256": sha,
                    "dataset": str(dataset),
                },
                indent=2,
            )
        )
        tmp.replace(where / RECORD)
        return prepared.dataset_dir


def prepared_dataset(data: DataConfig, where: Path) -> Path:
    """The dataset the stage prepared in ``where`` from ``data``'s corpus; refuses a missing or
    stale preparation in one line (training never tokenizes)."""
    record = _read_record(where)
    how = "run `slowqk prepare-data RECIPE` (or train through `slowqk train`, which prepares first)"
    if record is None:
        raise FileNotFoundError(f"data.corpus={data.corpus}: not prepared in {where}; {how}")
    if record["inputs"] != stage_inputs(data):
        raise ValueError(
            f"data.corpus={data.corpus}: {where} was prepared from other inputs "
            f"({record['inputs']}); {how}"
        )
    return where / record["dataset"]
