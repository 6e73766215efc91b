"""The decision engine's schema check (decision_engine.SchemaChecker) accepts
what fastavro decodes from a valid record and catches each kind of mismatch,
so the cross-language test cannot pass by checking nothing."""

from __future__ import annotations

import copy
import datetime
import io
import json
from pathlib import Path

import fastavro
import pytest

from decision_engine import SchemaChecker

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
UTC = datetime.timezone.utc


def schema(name: str):
    return json.loads((SCHEMAS / f"{name}.avsc").read_text())


def result(outcome: str) -> dict:
    return {
        "outcome": outcome,
        "polls": 2,
        "first_poll_at": datetime.datetime(2025, 1, 1, tzinfo=UTC),
        "finished_at": datetime.datetime(2025, 1, 1, 0, 1, tzinfo=UTC),
        "items": 3,
        "error_kind": None,
        "http_status": None,
        "error_message": None,
        "provider_request_id": None,
    }


def insights_ready() -> dict:
    return {
        "event_id": "e1",
        "user_id": "u1",
        "onboarded_at": datetime.datetime(2025, 1, 1, tzinfo=UTC),
        "completed_at": datetime.datetime(2025, 1, 1, 0, 2, tzinfo=UTC),
        "replay_of": None,
        "finbox": result("complete"),
        "credeau": result("timed_out"),
    }


def round_trip(name: str, record: dict) -> dict:
    """What an Avro consumer decodes after the record is written."""
    parsed = fastavro.parse_schema(schema(name))
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, record)
    buf.seek(0)
    return fastavro.schemaless_reader(buf, parsed)


def test_a_decoded_valid_record_has_no_errors():
    value = round_trip("insights_ready", insights_ready())
    assert SchemaChecker().check(value, schema("insights_ready")) == []


def test_decoded_predictor_values_of_every_branch_are_accepted_and_recorded():
    record = {
        "event_id": "e",
        "user_id": "u",
        "finbox_customer_id": "u",
        "onboarded_at": datetime.datetime(2025, 1, 1, tzinfo=UTC),
        "fetched_at": datetime.datetime(2025, 1, 1, tzinfo=UTC),
        "request_id": "r",
        "date_requested": None,
        "date_processed": None,
        "date_processed_at": None,
        "predictors": [
            {"name": "a", "value": None},
            {"name": "b", "value": True},
            {"name": "c", "value": 7},
            {"name": "d", "value": 0.5},
            {"name": "e", "value": "x"},
        ],
    }
    checker = SchemaChecker()
    assert checker.check(round_trip("finbox_predictors", record), schema("finbox_predictors")) == []
    assert checker.branches["$.predictors[].value"] == {"null", "boolean", "long", "double", "string"}


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda v: v.pop("completed_at"), "missing fields ['completed_at']"),
        (lambda v: v.update(surprise=1), "fields not in InsightsReady: ['surprise']"),
        (lambda v: v.update(onboarded_at=1_700_000_000_000), "$.onboarded_at: expected an aware datetime"),
        (lambda v: v["finbox"].update(outcome="maybe"), "$.finbox.outcome: 'maybe' is not one of"),
        (lambda v: v["finbox"].update(polls="2"), "$.finbox.polls: expected int"),
        (lambda v: v["finbox"].update(polls=2**40), "$.finbox.polls: expected int"),
        (lambda v: v["credeau"].update(http_status=True), "$.credeau.http_status: True matches no branch"),
        (lambda v: v.update(replay_of=5), "$.replay_of: 5 matches no branch"),
        (lambda v: v.update(credeau=None), "$.credeau: expected record ProviderResult"),
    ],
)
def test_each_kind_of_mismatch_is_reported(mutate, expected):
    value = copy.deepcopy(insights_ready())
    mutate(value)
    errors = SchemaChecker().check(value, schema("insights_ready"))
    assert any(expected in e for e in errors), errors


def test_sms_entries_are_checked_inside_arrays_and_maps():
    s = schema("sms_extraction")
    entry_fields = next(f for f in s["fields"] if f["name"] == "entries")["type"]["items"]["fields"]
    entry = {f["name"]: None for f in entry_fields}
    entry["extra"] = {"user_id": '"u"'}
    value = {
        "event_id": "e",
        "user_id": "u",
        "credeau_user_id": "u",
        "onboarded_at": datetime.datetime(2025, 1, 1, tzinfo=UTC),
        "fetched_at": datetime.datetime(2025, 1, 1, tzinfo=UTC),
        "part": 1,
        "parts": 1,
        "total_sms": 1,
        "entries": [entry],
    }
    checker = SchemaChecker()
    assert checker.check(round_trip("sms_extraction", value), s) == []
    assert "nonempty map" in checker.branches["$.entries[].extra"]
    bad = copy.deepcopy(value)
    bad["entries"][0]["extra"] = {"n": 12}
    bad["entries"][0]["is_classified"] = "yes"
    errors = SchemaChecker().check(bad, s)
    assert any(e.startswith("$.entries[].extra{}: expected string") for e in errors), errors
    assert any(e.startswith("$.entries[].is_classified: 'yes' matches no branch") for e in errors), errors
