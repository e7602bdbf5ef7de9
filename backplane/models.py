"""Backplane data: tenants, tokens, the outbox, streams, edges, connections, relay leases."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import models
from django.db.models.functions import Now

if TYPE_CHECKING:
    from django.db.backends.base.schema import BaseDatabaseSchemaEditor
    from django.db.backends.ddl_references import Statement


class BrinOnPostgres(models.Index):
    """A BRIN index on PostgreSQL (a B-tree elsewhere): for a column that grows with the rows'
    insertion order, like ``created_at``. Compaction's range deletes use it; publishing does
    not pay a B-tree insertion per row for it (docs/decisions/0003-brin-on-created-at.md)."""

    def create_sql(
        self, model: type[models.Model], schema_editor: BaseDatabaseSchemaEditor, using: str = "", **kwargs: Any
    ) -> Statement:
        if schema_editor.connection.vendor == "postgresql":
            using = " USING brin"
        return super().create_sql(model, schema_editor, using=using, **kwargs)


class MovedBucket(models.Func):
    """The 10-second bucket of a time, as a bigint: the indexed stand-in for ``updated_at``.

    Indexing ``updated_at`` itself made every head bump of the relay a non-HOT update (a new
    entry in every index of the table, a dead row only VACUUM removes); the bucket changes once
    per stream per 10 s (docs/decisions/0036-hot-stream-heads.md). Monotonic in its argument,
    so ``updated_at > T`` implies ``bucket(updated_at) >= bucket(T)`` when both are computed by
    this same expression. Immutable on PostgreSQL (an interval's epoch, not a timestamptz's).
    """

    output_field = models.BigIntegerField()

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = "(floor(extract(epoch from (%(expressions)s - timestamptz '1970-01-01 00:00:00+00')) / 10))::bigint"
        return self.as_sql(compiler, connection, template=template, **extra)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        template = "(CAST((julianday(%(expressions)s) - 2440587.5) * 86400 AS INTEGER) / 10)"
        return self.as_sql(compiler, connection, template=template, **extra)


class Tenant(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class AccessToken(models.Model):
    """A peer credential: one tenant, one device, one role. Only its hash is stored."""

    ROLE_CHOICES = [("client", "client"), ("node", "node"), ("operator", "operator")]

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="tokens")
    device_id = models.CharField(max_length=128)
    role = models.CharField(max_length=16, choices=ROLE_CHOICES)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    label = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(db_default=Now())
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["tenant", "device_id"])]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.device_id} ({self.role})"


class OperatorAccess(models.Model):
    """Lets a Django user connect with a session cookie as an operator of a tenant."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="bp_operator_once")]
        verbose_name_plural = "operator access"


class OutboxItem(models.Model):
    """One durable event or directed command. Only ``backplane.outbox`` writes these."""

    KIND_CHOICES = [("event", "event"), ("command", "command")]

    id = models.BigAutoField(primary_key=True)
    # No database FK on this hot, append-only table (docs/decisions/0004-no-foreign-keys-on-hot-tables.md):
    # ``publish`` checks the tenant in the same statement, and the ORM still PROTECTs tenants
    # that have outbox rows.
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, db_index=False, db_constraint=False)
    kind = models.CharField(max_length=8, choices=KIND_CHOICES, default="event")
    stream = models.CharField(max_length=200)
    event_id = models.CharField(max_length=100)
    type = models.CharField(max_length=100)
    occurred_at = models.DateTimeField()
    payload = models.JSONField()
    payload_bytes = models.IntegerField()
    shard = models.SmallIntegerField()
    created_at = models.DateTimeField(db_default=Now())
    stream_offset = models.BigIntegerField(null=True, blank=True)
    assigned_at = models.DateTimeField(null=True, blank=True)
    forwarded_at = models.DateTimeField(null=True, blank=True)
    # Directed commands only: why the command was not delivered to its edge (re-routed, or
    # no live edge holds its target). Shown by backplane_status and the admin.
    undeliverable_reason = models.CharField(max_length=200, null=True, blank=True)

    class Meta:
        permissions = [
            ("view_payload", "Can view outbox payloads"),
            ("view_live_events", "Can watch events live in the admin (of tenants with operator access)"),
        ]
        # No unique (tenant, event_id) here: on PostgreSQL this table is partitioned by
        # created_at, and a unique constraint there must include the partition key.
        # ``EventKey`` keeps publishing idempotent instead.
        indexes = [
            # The relay claims unassigned rows in id order across its shards: id leads, and
            # shard rides in the index so rows of other shards are skipped without a heap visit.
            models.Index(
                fields=["id", "shard"],
                name="bp_outbox_unassigned_id",
                condition=models.Q(stream_offset__isnull=True),
            ),
            models.Index(
                fields=["shard", "stream", "stream_offset"],
                name="bp_outbox_unforwarded",
                condition=models.Q(forwarded_at__isnull=True, stream_offset__isnull=False),
            ),
            # Reads by stream and offset (gap fill, resume). Partial: a row enters it when it gets
            # its offset, not also when it is published (docs/decisions/0006-partial-stream-offset-index.md).
            models.Index(
                fields=["stream", "stream_offset"],
                name="bp_outbox_stream_offset",
                condition=models.Q(stream_offset__isnull=False),
            ),
            BrinOnPostgres(fields=["created_at"], name="bp_outbox_created_brin"),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.event_id}"


class EventKey(models.Model):
    """One row per published ``(tenant, event_id)``: makes ``publish`` idempotent.

    Inserted with ON CONFLICT DO NOTHING in the producer's transaction, together with the
    outbox row; kept as long as the retention window (compaction removes older keys), so
    a retry inside the window is a no-op.
    """

    pk = models.CompositePrimaryKey("tenant_id", "event_id")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, db_constraint=False, db_index=False)
    event_id = models.CharField(max_length=100)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        indexes = [BrinOnPostgres(fields=["created_at"], name="bp_eventkey_created_brin")]


class Stream(models.Model):
    """An audience's sequence: epoch, last assigned offset, lowest retained offset."""

    key = models.CharField(max_length=200, primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, db_index=False)
    audience = models.CharField(max_length=8)
    epoch = models.CharField(max_length=16)
    last_offset = models.BigIntegerField(default=0)
    first_retained_offset = models.BigIntegerField(default=1)
    updated_at = models.DateTimeField(db_default=Now())
    # The edges' head check asks for the streams whose head moved since its last check
    # (docs/decisions/0027-head-check-change-feed.md) by this bucket, not by updated_at: a head
    # bump within the same bucket stays a HOT update (docs/decisions/0036-hot-stream-heads.md).
    # Generated, so any writer of updated_at (relays of the release before too) keeps it right.
    moved_bucket = models.GeneratedField(
        expression=MovedBucket("updated_at"), output_field=models.BigIntegerField(), db_persist=True
    )

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "audience"], name="bp_stream_tenant"),
            models.Index(fields=["moved_bucket"], name="bp_stream_moved"),
        ]

    def __str__(self) -> str:
        return self.key


class Edge(models.Model):
    edge_id = models.CharField(max_length=64, primary_key=True)
    host = models.CharField(max_length=200, blank=True, default="")
    started_at = models.DateTimeField(db_default=Now())
    heartbeat_at = models.DateTimeField(db_default=Now())

    def __str__(self) -> str:
        return self.edge_id


class Connection(models.Model):
    """A live socket in the connection directory; ``expires_at`` is refreshed by heartbeats."""

    connection_id = models.CharField(max_length=32, primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE)
    device_id = models.CharField(max_length=128)
    role = models.CharField(max_length=16)
    token = models.ForeignKey(AccessToken, null=True, blank=True, on_delete=models.SET_NULL)
    edge = models.ForeignKey(Edge, on_delete=models.CASCADE, related_name="connections")
    channel_name = models.CharField(max_length=200)
    connected_at = models.DateTimeField(db_default=Now())
    last_seen_at = models.DateTimeField(db_default=Now())
    expires_at = models.DateTimeField()
    # Where the peer stands, by stream: {"device": [last offset delivered, lag behind the head]},
    # written by its edge's heartbeat (never per event). Nullable: edges of the previous
    # version insert rows without it during an online upgrade.
    positions = models.JSONField(default=dict, blank=True, null=True)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "device_id"], name="bp_conn_device"),
            # No index on expires_at: the heartbeat's refresh of every row stays a HOT update
            # (migration 0018, docs/decisions/0045-heartbeat-rows-hot.md).
        ]

    def __str__(self) -> str:
        return self.connection_id


class RelayLease(models.Model):
    """Who forwards a shard, and its progress: shown by the admin and backplane_status.

    The lease itself is a PostgreSQL advisory lock held by the relay's session; this row
    only reports it.
    """

    shard = models.IntegerField(primary_key=True)
    holder = models.CharField(max_length=200, blank=True, default="")
    acquired_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    forwarded_total = models.BigIntegerField(default=0)
    last_forwarded_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"shard {self.shard}"


class TokenAudit(models.Model):
    """One event in a token's life: created, rotated, revoked, or found expired; by whom.

    Never the token or its hash. No foreign keys: the record outlives the token, and its tenant.
    """

    ACTION_CHOICES = [("create", "create"), ("rotate", "rotate"), ("revoke", "revoke"), ("expire", "expire")]

    id = models.BigAutoField(primary_key=True)
    at = models.DateTimeField(db_default=Now())
    # A user name (the admin), "cli" (management commands) or "system" (the edge, code).
    actor = models.CharField(max_length=150)
    action = models.CharField(max_length=8, choices=ACTION_CHOICES)
    token_id = models.UUIDField()
    tenant_id = models.UUIDField()
    device_id = models.CharField(max_length=128)
    note = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["token_id"], name="bp_token_audit_token")]
        constraints = [
            # A token expires once: the edges' heartbeats and refused upgrades record it at most once.
            models.UniqueConstraint(
                fields=["token_id"], condition=models.Q(action="expire"), name="bp_token_audit_expired_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.token_id} by {self.actor}"
