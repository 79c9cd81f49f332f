"""Issue #13 (spec §11): the upstream list comes through a secret, and the function may read
exactly the secrets named — the list's and the keys it names — and no other."""

from fnmatch import fnmatchcase

import cfn
from cfn import as_list, render, statements

PREFIX = "arn:aws:secretsmanager:us-east-1:123456789012:secret:"
UPSTREAMS = PREFIX + "openai-proxy/upstreams-Up1234"
AZURE_KEY = PREFIX + "openai-proxy/azure-key-Az5678"
US_KEY = PREFIX + "openai-proxy/us-key-Us9012"


def secret_grants(rendered: dict) -> list[str]:
    role = rendered["Resources"][rendered["Resources"]["ProxyFunction"]["Properties"]["Role"]["Fn::GetAtt"][0]]
    return [
        r
        for s in statements(role)
        if "secretsmanager:GetSecretValue" in as_list(s["Action"])
        for r in as_list(s["Resource"])
    ]


def granted(rendered: dict, arn: str) -> bool:
    return any(fnmatchcase(arn, r) for r in secret_grants(rendered))


def test_the_upstream_list_and_the_keys_it_names_are_readable_and_nothing_else():
    rendered = render({"UpstreamsSecretArn": UPSTREAMS, "UpstreamKeySecretArns": f"{AZURE_KEY},{US_KEY}"})
    env = rendered["Resources"]["ProxyFunction"]["Properties"]["Environment"]["Variables"]
    assert env["UPSTREAMS_SECRET_ARN"] == UPSTREAMS
    for arn in [UPSTREAMS, AZURE_KEY, US_KEY, cfn.OPENAI_SECRET, cfn.TOKENS_SECRET]:
        assert granted(rendered, arn), arn
    for arn in [PREFIX + "openai-proxy/other-AbCdEf", PREFIX + "openai-proxy/azure-key-Az5678-old-XyZ123"]:
        assert not granted(rendered, arn), arn
    assert all("*" not in r.replace("-??????", "") for r in secret_grants(rendered))


def test_without_an_upstream_list_no_grant_is_added():
    rendered = render()
    env = rendered["Resources"]["ProxyFunction"]["Properties"]["Environment"]["Variables"]
    assert env["UPSTREAMS_SECRET_ARN"] == ""
    assert not granted(rendered, UPSTREAMS)
    assert sorted(set(secret_grants(rendered))) == sorted(set(secret_grants(render())))
    assert len(secret_grants(rendered)) == 4  # the OpenAI key and the tokens, each with its suffix form


def test_the_openai_key_secret_is_optional_only_with_an_upstream_list():
    template = cfn.load_template()
    rule = template["Rules"]["OpenAIKeySecretRequired"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "UpstreamsSecretArn"}, ""]}


def test_switching_and_breaker_settings_reach_the_function():
    env = render({"FallbackAfterFailures": 3, "BreakerFailures": 0, "BreakerCooldownMs": 2500,
                  "SkipHopelessAttempts": "false", "ModelFallbacks": '{"gpt-4o": ["gpt-4o-mini"]}'})[
        "Resources"]["ProxyFunction"]["Properties"]["Environment"]["Variables"]
    assert (env["FALLBACK_AFTER_FAILURES"], env["BREAKER_FAILURES"], env["BREAKER_COOLDOWN_MS"]) == ("3", "0", "2500")
    assert env["SKIP_HOPELESS_ATTEMPTS"] == "false"
    assert env["MODEL_FALLBACKS"] == '{"gpt-4o": ["gpt-4o-mini"]}'
