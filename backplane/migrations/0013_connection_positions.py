"""Where each peer stands (issue 16): ``Connection.positions``, written by the heartbeat.

Nullable, so edges of the previous version keep inserting rows while this one rolls out.
"""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('backplane', '0012_live_events_permission'),
    ]

    operations = [
        migrations.AddField(
            model_name='connection',
            name='positions',
            field=models.JSONField(blank=True, default=dict, null=True),
        ),
    ]
