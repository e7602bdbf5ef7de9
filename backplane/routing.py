from django.urls import path

from backplane.consumers import GatewayConsumer

# channels' stubs type a consumer as an ASGI app; django-stubs' path() expects a view.
websocket_urlpatterns = [path("ws", GatewayConsumer.as_asgi())]  # type: ignore[arg-type]
