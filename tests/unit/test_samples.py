"""The shared sample JSONL format: valid records round-trip, bad lines are reported by line."""

from __future__ import annotations

import json

from megatron_vlm.data.samples import Sample, SampleError, read_samples

GOOD = {"id": "d:extract-single:0", "task": "extract-single", "image_root": "/pool",
        "images": ["images/a/0001.jpg", "/pool/images/b/0002.jpg"], "image_tokens": [2508, 2508],
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                  {"type": "text", "text": "On Page 2, what is X?"}]},
                     {"role": "assistant", "content": "42"}],
        "meta": {"answer": "42", "answer_format": "Integer", "evidence_pages": [2]}}


def test_round_trip_and_paths():
    s = Sample.from_dict(GOOD)
    assert Sample.from_dict(json.loads(s.to_json())) == s
    assert s.image_paths() == ["/pool/images/a/0001.jpg", "/pool/images/b/0002.jpg"]  # absolute: inside the root


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    bad_slots = dict(GOOD, images=["one.jpg"], image_tokens=None)
    no_assistant = dict(GOOD, messages=GOOD["messages"][:1])
    lines = [json.dumps(GOOD), "{not json", "", json.dumps(bad_slots), json.dumps(dict(GOOD, task="chat")),
             json.dumps(no_assistant), json.dumps([1, 2])]
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(lines) + "\n")
    results = list(read_samples(str(path)))
    assert [n for n, _ in results] == [1, 2, 4, 5, 6, 7]
    assert isinstance(results[0][1], Sample)
    errors = {n: str(r) for n, r in results if isinstance(r, SampleError)}
    assert "x.jsonl:2" in errors[2] and "not valid JSON" in errors[2]
    assert "2 image slots" in errors[4] and "task 'chat'" in errors[5]
    assert "no assistant turn" in errors[6] and "JSON object" in errors[7]
