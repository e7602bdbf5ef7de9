from django.apps import AppConfig


class BackplaneConfig(AppConfig):
    name = "backplane"
    verbose_name = "Backplane"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from backplane import checks  # noqa: F401  (registers the system checks)
