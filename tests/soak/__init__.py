"""The soak: rawproxy under a mix of clients while its backends die and come back
(``make soak``; a shortened run in ``test_soak.py``)."""
