"""The probes (issue 16): ``/livez`` and ``/healthz`` are liveness — 200 while the process
serves, whatever it depends on; ``/readyz`` is readiness — 503 naming the failing part."""

from __future__ import annotations

import json

import pytest
from django.test import RequestFactory

from backplane import status, views


@pytest.fixture
def request_() -> object:
    return RequestFactory().get("/")


def test_probes__liveness_answers_while_readiness_says_draining(request_, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "_draining", lambda: True)
    assert views.livez(request_).status_code == 200
    assert views.healthz(request_).status_code == 200
    answer = views.readyz(request_)
    assert answer.status_code == 503
    assert json.loads(answer.content) == {"ok": False, "edge": "draining"}


@pytest.mark.django_db
def test_probes__readiness_names_redis_when_it_does_not_answer(request_, monkeypatch: pytest.MonkeyPatch) -> None:
    def down() -> None:
        raise ConnectionError("refused")

    monkeypatch.setattr(views, "_draining", lambda: False)
    monkeypatch.setattr(status, "redis_ping", down)
    answer = views.readyz(request_)
    assert answer.status_code == 503
    assert json.loads(answer.content) == {"ok": False, "redis": "unreachable (ConnectionError)"}
    assert views.healthz(request_).status_code == 200
