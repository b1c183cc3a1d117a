"""benchmarks/dump_logits.py's comparison of two builds' dumps: equal dumps pass, and any entry that
differs (a float by one ulp, an arg-max, a missing entry) fails and is named."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def dump_logits(benchmark_script):
    return benchmark_script("dump_logits")


def dumps(tmp_path, a: dict, b: dict) -> tuple[str, str]:
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(a, pa)
    torch.save(b, pb)
    return str(pa), str(pb)


def entries(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"m/b1/step0/logits": torch.randn(1, 32, generator=g), "m/b1/step0/argmax": torch.tensor([3], dtype=torch.int32)}


def test_equal_dumps_pass(dump_logits, tmp_path, capsys):
    assert dump_logits.compare(*dumps(tmp_path, entries(), entries())) == 0
    assert "every value equal" in capsys.readouterr().out


def test_one_ulp_fails_and_is_named(dump_logits, tmp_path, capsys):
    b = entries()
    x = b["m/b1/step0/logits"]
    x[0, 5] = torch.nextafter(x[0, 5], torch.tensor(float("inf")))
    assert dump_logits.compare(*dumps(tmp_path, entries(), b)) == 1
    out = capsys.readouterr().out
    assert "m/b1/step0/logits: 1 of 32 differ" in out and "1 of 2 entries identical" in out


def test_argmax_and_missing_entries_fail(dump_logits, tmp_path, capsys):
    b = entries()
    b["m/b1/step0/argmax"] = torch.tensor([4], dtype=torch.int32)
    assert dump_logits.compare(*dumps(tmp_path, entries(), b)) == 1
    assert "m/b1/step0/argmax: 1 of 1 differ" in capsys.readouterr().out
    del b["m/b1/step0/argmax"]
    assert dump_logits.compare(*dumps(tmp_path, entries(), b)) == 1
    assert "different entries" in capsys.readouterr().out
