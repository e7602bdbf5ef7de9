"""Compaction's metrics: counted in the process, written by ``compact_outbox --metrics-file``."""

from __future__ import annotations

import time

import pytest
from django.core.management import call_command
from prometheus_client.parser import text_string_to_metric_families

from backplane import metrics, outbox
from backplane.conf import conf
from backplane.models import OutboxItem
from backplane.store import get_store

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_compact_outbox__metrics_file_counts_the_rows_removed_and_the_success_time(tenant_factory, tmp_path):
    tenant = tenant_factory("acme")
    outbox.publish_many(tenant, [{"type": "m.t", "payload": {"i": i}} for i in range(6)])
    get_store().assign(list(range(conf.SHARDS)), 10_000)
    get_store().mark_forwarded(list(OutboxItem.objects.values_list("id", flat=True)))
    before = metrics.compaction.rows_removed["rows"]
    started = time.time()
    path = tmp_path / "compaction.prom"

    call_command("compact_outbox", "--max-rows", "2", "--metrics-file", str(path), stdout=None)

    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(path.read_text()) for s in f.samples}
    assert got[("tyrum_backplane_compaction_rows_removed_total", (("rule", "rows"),))] == before + 4
    assert got[("tyrum_backplane_compaction_last_success_timestamp_seconds", ())] >= started
    assert OutboxItem.objects.count() == 2
