"""``TokenAudit``: who created, rotated and revoked which token, and when one was found expired.

A new, small table written only by ``backplane.auth``: nothing on the hot paths reads it.
"""

import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('backplane', '0010_assign_function_v2'),
    ]

    operations = [
        migrations.CreateModel(
            name='TokenAudit',
            fields=[
                ('id', models.BigAutoField(primary_key=True, serialize=False)),
                ('at', models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
                ('actor', models.CharField(max_length=150)),
                ('action', models.CharField(choices=[('create', 'create'), ('rotate', 'rotate'), ('revoke', 'revoke'), ('expire', 'expire')], max_length=8)),
                ('token_id', models.UUIDField()),
                ('tenant_id', models.UUIDField()),
                ('device_id', models.CharField(max_length=128)),
                ('note', models.CharField(blank=True, default='', max_length=200)),
            ],
            options={
                'ordering': ['-id'],
                'indexes': [models.Index(fields=['token_id'], name='bp_token_audit_token')],
                'constraints': [models.UniqueConstraint(condition=models.Q(('action', 'expire')), fields=('token_id',), name='bp_token_audit_expired_once')],
            },
        ),
    ]
