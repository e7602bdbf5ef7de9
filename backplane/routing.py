from django.urls import path

from backplane.consumers import GatewayConsumer

websocket_urlpatterns = [path("ws", GatewayConsumer.as_asgi())]
