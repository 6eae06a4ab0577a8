"""API Gateway's REQUEST authorizer: lets a request through only with the plugin's Secret header."""

from dalle_plugin import wiring
from dalle_plugin.domain.auth import SECRET_HEADER, AuthorizerRequest, authorizer_policy, secret_matches
from dalle_plugin.domain.errors import PluginSecretTooShort
from dalle_plugin.observability import lambda_handler, logger


@lambda_handler
def handler(event: dict, context: object) -> dict:
    request = AuthorizerRequest.model_validate(event)
    try:
        allowed = secret_matches(request.header(SECRET_HEADER), wiring.authorizer_secret())
    except PluginSecretTooShort as exc:
        logger.error(exc.message, extra={"error": type(exc).__name__, "reason": exc.reason})
        allowed = False
    return authorizer_policy(request, allowed)
