from tests.integration.test_service import *  # noqa
def test_probe(client):
    for path in ("/v1/no-such-route", "/v1/models/x", "/nothing", "/v1/"):
        r = client.get(path); print(path, r.status_code, r.headers.get("content-type"), r.text[:100])
