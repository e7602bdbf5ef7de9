"""The edges' head check reads only the streams whose head moved since its last check:
an index on ``backplane_stream.updated_at`` (docs/decisions/0027-head-check-change-feed.md)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('backplane', '0013_connection_positions'),
    ]

    operations = [
        migrations.AddIndex(
            model_name='stream',
            index=models.Index(fields=['updated_at'], name='bp_stream_updated'),
        ),
    ]
