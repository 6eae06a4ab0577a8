"""API function: the hub's REST connector endpoint (routes in dalle_plugin.rest_api).

Init imports only the logging (Powertools' Logger). The routes with their pydantic models, the plugin's
router, the domain and the AWS adapters load on the first request (docs/performance.md, "Cold starts", says
what that request pays)."""

from typing import TYPE_CHECKING, Any

from dalle_plugin.observability import lambda_handler

if TYPE_CHECKING:  # a type only: the module is not loaded at a cold start
    from aws_lambda_powertools.utilities.typing import LambdaContext


@lambda_handler
def handler(event: dict, context: "LambdaContext") -> dict:
    from dalle_plugin.rest_api import handle

    return handle(event, context)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of the API's routes (``make openapi``)."""
    from dalle_plugin.rest_api import openapi_document as document

    return document()
