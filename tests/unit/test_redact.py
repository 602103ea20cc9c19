"""What is shown of a URL: one rule (`loom_ha._redact`) for every message that may echo one."""

from __future__ import annotations

import pytest

from loom_ha._redact import redact, without_credentials
from loom_ha.discovery.consul import parse_consul_address
from loom_ha.errors import ConfigurationError
from loom_ha.spec import parse_transport_url

SECRET = "S3CRET"


@pytest.mark.parametrize(
    ("text", "url", "shown"),
    [
        ("consul://S3CRET@h:1", None, "consul://***@h:1"),
        ("consul://h:1/?token=S3CRET&dc=x", None, "consul://h:1/?token=***&dc=x"),
        (
            "URL 'redis+sentinel://app:pw%40S3CRET@h:1,h:2/m?sentinel_password=S3CRET&mode=x'",
            None,
            "URL 'redis+sentinel://***@h:1,h:2/m?sentinel_password=***&mode=x'",
        ),
        # A client's message may print the password decoded: the URL says what it was.
        (
            "refused by redis://app:pw/é@S3CRET@h:1",
            "redis://app:pw%2F%C3%A9%40S3CRET@h:1/0",
            "refused by redis://***@h:1",
        ),
        ("'consul://my S3CRET@h:1'", "consul://my S3CRET@h:1", "'consul://***@h:1'"),
        ("at http://h:1 said nobody@example.com", None, "at http://h:1 said nobody@example.com"),
    ],
)
def test_redact_hides_credentials_and_nothing_else(text: str, url: str | None, shown: str) -> None:
    """Userinfo and token/password options become ***, in any form the URL gives them;
    text around them stays as it was."""
    assert redact(text, url) == shown


def test_an_endpoint_keeps_scheme_and_address_only() -> None:
    """An endpoint drops the userinfo and the whole query (its options may hold secrets)."""
    assert without_credentials("redis://app:S3CRET@h:1/0?password=S3CRET") == "redis://h:1/0"


def test_consul_address_variable_without_scheme_hides_its_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CONSUL_HTTP_ADDR as TOKEN@host:port (no scheme) that is refused: the error names the
    variable but not its token."""
    monkeypatch.setenv("CONSUL_HTTP_ADDR", f"{SECRET}@h:notaport")
    with pytest.raises(ConfigurationError, match="CONSUL_HTTP_ADDR") as raised:
        parse_consul_address()
    assert SECRET not in str(raised.value)


def test_a_bad_transport_query_hides_its_passwords() -> None:
    """A transport URL whose query does not parse: the error shows the query without the
    value of its password options."""
    with pytest.raises(ConfigurationError, match="query") as raised:
        parse_transport_url(f"redis://h:1/0?sentinel_password={SECRET}&&mode=streams")
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://app:{SECRET}@h:1/0/extra",
        f"redis+sentinel://app:{SECRET}@h:1",
        f"redis://app:{SECRET}@",
        f"redis://app:{SECRET}@h:1,h:2/0",
        f"app:{SECRET}@h:1",
    ],
)
def test_a_bad_redis_url_is_named_without_its_password(url: str) -> None:
    """Every refusal of a Redis URL names the URL, its password shown as ***."""
    from loom_ha.redis.url import parse_redis_url

    with pytest.raises(ConfigurationError, match="redis") as raised:
        parse_redis_url(url)
    assert SECRET not in str(raised.value)
    assert "***" in str(raised.value)
