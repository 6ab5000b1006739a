"""Everything between a member's socket and the relay's parts: the connection layer around hypercorn's
protocol, the app and its routes, admission, delivery of held requests, the answers and the views."""
