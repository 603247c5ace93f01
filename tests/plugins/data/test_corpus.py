"""tools/fetch_corpus.sh: the offline sentence corpus (PyPI's vaderSentiment 3.3.2, the VADER
ICWSM-2014 data set) in data/vader-icwsm2014, checked against what the script pins.

The script's own pins are checked always; the corpus itself where it has been fetched
(`make data` or `bash tools/fetch_corpus.sh`; $CORPUS_DIR to look elsewhere), else skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "tools" / "fetch_corpus.sh"
CORPUS = Path(os.environ.get("CORPUS_DIR") or REPO / "data" / "vader-icwsm2014")
DOMAINS = ("tweets", "nyt-editorials", "movie-reviews", "amazon-reviews")
HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def script_value(name: str) -> str:
    found = re.search(rf'^{name}="?([^"\n]*)"?$', SCRIPT.read_text(), re.M)
    assert found, f"{SCRIPT.name} sets no {name}"
    return found.group(1)


def script_table(name: str) -> dict[str, str]:
    """A ``declare -A NAME=( [key]=value ... )`` table of the script."""
    found = re.search(rf"^declare -A {name}=\((.*?)^\)", SCRIPT.read_text(), re.M | re.S)
    assert found, f"{SCRIPT.name} declares no table {name}"
    return dict(re.findall(r"\[([^\]]+)\]=(\S+)", found.group(1)))


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]  # every line ends with \n


def rows(path: Path) -> list[list[str]]:
    table = [line.split("\t") for line in lines(path)]
    assert table[0] == ["domain", "id", "mean_sentiment", "sentence"], f"{path.name} header"
    return table[1:]


@pytest.fixture(scope="module")
def corpus() -> dict:
    """corpus.json of the fetched corpus; the test is skipped where it was not fetched."""
    if not (CORPUS / "corpus.json").is_file():
        pytest.skip(f"{CORPUS} holds no fetched corpus: run `bash tools/fetch_corpus.sh` "
                    "(or `make data`) to fetch PyPI's vaderSentiment 3.3.2 and build it")
    return json.loads((CORPUS / "corpus.json").read_text(encoding="utf-8"))


# --- the script, always -------------------------------------------------------------------


def test_script_pins_every_file_by_a_well_formed_sha256():
    assert script_value("PACKAGE") == "vaderSentiment" and script_value("VERSION") == "3.3.2"
    assert HEX64.fullmatch(script_value("SDIST_SHA256"))
    assert HEX64.fullmatch(script_value("MEMBER_SHA256"))
    sources = script_table("SOURCE_SHA256")
    assert sorted(sources) == sorted(["tweets_GroundTruth.txt", "nytEditorialSnippets_GroundTruth.txt",
                                      "movieReviewSnippets_GroundTruth.txt",
                                      "amazonReviewSnippets_GroundTruth.txt"])
    outputs = script_table("OUTPUT_SHA256")
    assert sorted(outputs) == ["eval.tsv", "eval.txt", "train.tsv", "train.txt"]
    for value in [*sources.values(), *outputs.values()]:
        assert HEX64.fullmatch(value), value
    assert 0 < int(script_value("EVAL_PERCENT")) < 50


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- the fetched corpus ---------------------------------------------------------------------


def test_recorded_source_is_the_pinned_package(corpus):
    source = corpus["source"]
    assert (source["registry"], source["package"], source["version"]) == ("PyPI", "vaderSentiment", "3.3.2")
    assert source["file"] == script_value("SDIST")
    assert source["sha256"] == script_value("SDIST_SHA256")
    assert source["member"] == script_value("MEMBER")
    assert source["member_sha256"] == script_value("MEMBER_SHA256")
    assert source["files"] == script_table("SOURCE_SHA256")
    assert "MIT" in corpus["license"] and "Hutto" in corpus["citation"]


def test_files_match_the_recorded_and_the_pinned_sha256(corpus):
    pinned = script_table("OUTPUT_SHA256")
    assert corpus["files"] == pinned
    for name, digest in pinned.items():
        assert sha256(CORPUS / name) == digest, f"{name} differs from its pinned sha256"


def test_counts_match_the_files(corpus):
    counts = corpus["counts"]
    for split in ("train", "eval"):
        text, table = lines(CORPUS / f"{split}.txt"), rows(CORPUS / f"{split}.tsv")
        assert len(text) == len(table) == counts[split]
        assert [row[3] for row in table] == text  # the tsv is the same lines, in order
        by_domain = {domain: sum(row[0] == domain for row in table) for domain in DOMAINS}
        assert by_domain == counts["by_domain"][split]
        assert all(by_domain[domain] > 0 for domain in DOMAINS), f"{split}: a domain is missing"
        for row in table:
            float(row[2])  # the human rating is a number
    total = counts["train"] + counts["eval"]
    assert total >= 20000
    assert counts["eval"] >= 2000
    assert 0.05 < counts["eval"] / total < 0.15  # 10% of each domain's documents


def test_train_and_eval_are_non_empty_deduplicated_and_disjoint(corpus):
    train, held = lines(CORPUS / "train.txt"), lines(CORPUS / "eval.txt")
    assert train and held
    for split, text in (("train", train), ("eval", held)):
        assert all(line and line == line.strip() and "\t" not in line for line in text), split
        assert all(any(ch.isalpha() for ch in line) for line in text), split
        assert len({line.casefold() for line in text}) == len(text), f"{split} has duplicates"
    assert not set(train) & set(held)
    assert not {line.casefold() for line in train} & {line.casefold() for line in held}


def test_no_document_straddles_the_split(corpus):
    def documents(split: str) -> set[tuple[str, str]]:
        return {(row[0], row[1].split("_")[0]) for row in rows(CORPUS / f"{split}.tsv")
                if row[0] in ("nyt-editorials", "amazon-reviews")}

    assert documents("train") and documents("eval")
    assert not documents("train") & documents("eval")


def test_recorded_lengths_match_the_files(corpus):
    def figures(text: list[str]) -> dict:
        sizes = sorted(len(line) for line in text)
        return {"median": statistics.median(sizes), "p95": sizes[math.ceil(0.95 * len(sizes)) - 1],
                "min": sizes[0], "max": sizes[-1]}

    train, held = lines(CORPUS / "train.txt"), lines(CORPUS / "eval.txt")
    for name, text in (("train", train), ("eval", held), ("all", train + held)):
        recorded = corpus["length_chars"][name]
        assert {key: recorded[key] for key in ("median", "p95", "min", "max")} == figures(text), name
    everything = corpus["length_chars"]["all"]
    assert everything["p95"] > 2 * everything["median"] > 4 * everything["min"]  # varied lengths
