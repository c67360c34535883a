"""Key names: any job id maps to one key form of its own, with no braces (the cluster hash
tag) and nothing a path could climb out with, and back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from jobwire.protocol import Keys, id_from_key, key_id
from jobwire.storage import job_of, object_key

ids = st.text(min_size=1, max_size=300)


@given(ids, ids)
def test_key_forms_are_collision_free_and_reversible(a: str, b: str) -> None:
    assert id_from_key(key_id(a)) == a
    assert (key_id(a) == key_id(b)) == (a == b)


@given(ids)
def test_key_forms_are_safe_in_keys_and_paths(job_id: str) -> None:
    form = key_id(job_id)
    assert "{" not in form and "}" not in form and "/" not in form and not form.startswith(".")
    keys = Keys()
    assert keys.job_id_from_channel(keys.job_channel(job_id)) == job_id
    path = object_key(job_id, "result.json")
    assert all(0 < len(part) <= 200 and part not in (".", "..") for part in path.split("/"))
    assert job_of(path) == job_id


def test_plain_ids_are_kept_as_they_are() -> None:
    for job_id in ("3f2c1a9e-1d2b-4c5d-8e9f-0a1b2c3d4e5f", "order:42", "report_7.pdf-gen"):
        assert key_id(job_id) == job_id
    assert key_id("~x") != "~x" and key_id("..") != ".."
