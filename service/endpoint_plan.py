"""How a route's endpoint gets its arguments, planned once per route instead of per request.

FastAPI solves a route's dependencies anew on every request: for each dependency and each
kind of parameter it walks the annotations again (is this a sequence? a model? which
alias?). On ``POST /jobs`` that walk was 40% of the time the service spends on the request
outside the database. Our routes use a small part of what FastAPI allows: ``async def``
dependencies that take only the ``Request``, scalar path, query and header parameters, at
most one JSON body model, and the ``Request`` itself. For a route that stays within that,
``plan_for`` works the walk out once; ``EndpointPlan.call`` then does per request only
what depends on the request: look the values up, validate them with the very same pydantic
fields FastAPI built, and call the endpoint. Errors are collected in FastAPI's order and
format (path, query, header, then body) and raised as the same ``RequestValidationError``.

A route outside that subset, or an app with ``dependency_overrides`` (tests), goes through
FastAPI's own handler: ``plan_for`` returns None, and ``GuardedRoute`` checks overrides per
request. ``tests/test_endpoint_plan.py`` sends the same requests both ways."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_type_hints

from fastapi import Request, Response, params
from fastapi._compat import ModelField
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import (
    _get_param_aliases,
    _get_param_model,
    _is_json_field,
    _validate_value_with_model_field,
)
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic_core import PydanticUndefined

Source = Literal["path", "query", "header"]
Dependency = Callable[[Request], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class _Param:
    name: str  # the endpoint's argument
    source: Source
    field: ModelField
    aliases: tuple[str, ...]  # the request keys FastAPI accepts, in its order

    def value(self, found: Mapping[str, Any], values: dict[str, Any]) -> tuple[Any, list[Any]]:
        key = next((alias for alias in self.aliases if alias in found), self.aliases[0])
        raw = found.get(key)
        return _validate_value_with_model_field(
            field=self.field,
            value=PydanticUndefined if raw is None else raw,
            values=values,
            loc=(self.source, key),
        )


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    endpoint: Callable[..., Awaitable[Response]]
    dependencies: tuple[Dependency, ...]  # each distinct one, called once, in order
    arguments: tuple[tuple[str, int], ...]  # endpoint argument <- dependencies[index]
    params: tuple[_Param, ...]
    body: tuple[str, ModelField] | None
    request_argument: str | None

    async def call(self, request: Request, body: Any) -> Response:
        """The endpoint's answer; ``body`` is the parsed JSON body, or
        ``PydanticUndefined`` when the request had none."""
        solved = [await dependency(request) for dependency in self.dependencies]
        values: dict[str, Any] = {name: solved[index] for name, index in self.arguments}
        errors: list[Any] = []
        for param in self.params:
            value, problems = param.value(_source(request, param.source), values)
            if problems:
                errors.extend(problems)
            else:
                values[param.name] = value
        if self.body is not None:
            name, field = self.body
            value, problems = _validate_value_with_model_field(
                field=field, value=body, values=values, loc=("body",)
            )
            if problems:
                errors.extend(problems)
            else:
                values[name] = value
        if errors:
            raise RequestValidationError(errors, body=None if body is PydanticUndefined else body)
        if self.request_argument is not None:
            values[self.request_argument] = request
        return await self.endpoint(**values)


def _source(request: Request, source: Source) -> Mapping[str, Any]:
    if source == "path":
        return request.path_params
    if source == "query":
        return request.query_params
    return request.headers


def plan_for(route: APIRoute) -> EndpointPlan | None:
    """The plan for ``route``, or None when it uses anything outside the subset above."""
    dependant = route.dependant
    if not (_plain(dependant) and _answers_with_response(dependant.call)):
        return None
    dependencies: list[Dependency] = []
    arguments: list[tuple[str, int]] = []
    for sub in dependant.dependencies:
        if not _simple_dependency(sub):
            return None
        call: Dependency = sub.call  # type: ignore[assignment]
        if call not in dependencies:
            dependencies.append(call)
        if sub.name is not None:
            arguments.append((sub.name, dependencies.index(call)))
    plan_params = _params(dependant)
    body = _body(route)
    if plan_params is None or body is False:
        return None
    return EndpointPlan(
        endpoint=dependant.call,  # type: ignore[arg-type]
        dependencies=tuple(dependencies),
        arguments=tuple(arguments),
        params=plan_params,
        body=body,
        request_argument=dependant.request_param_name,
    )


def _plain(dependant: Dependant) -> bool:
    """No parameter kinds beyond path, query, header, body and the request."""
    return (
        asyncio.iscoroutinefunction(dependant.call)
        and not dependant.cookie_params
        and dependant.websocket_param_name is None
        and dependant.http_connection_param_name is None
        and dependant.response_param_name is None
        and dependant.background_tasks_param_name is None
        and dependant.security_scopes_param_name is None
        and not dependant.own_oauth_scopes
        and dependant.concurrency is None
    )


def _simple_dependency(sub: Dependant) -> bool:
    """An ``async def`` taking only the request, cached per request (FastAPI's default)."""
    return (
        _plain(sub)
        and sub.use_cache
        and not sub.dependencies
        and not (sub.path_params or sub.query_params or sub.header_params or sub.body_params)
    )


def _answers_with_response(endpoint: Callable[..., Any] | None) -> bool:
    """Only endpoints that render their own answer: no ``response_model`` serialisation."""
    if endpoint is None:
        return False
    try:
        returned = get_type_hints(endpoint).get("return")
    except (NameError, TypeError):
        return False
    return inspect.isclass(returned) and issubclass(returned, Response)


def _params(dependant: Dependant) -> tuple[_Param, ...] | None:
    found: list[_Param] = []
    kinds: tuple[tuple[Source, list[ModelField]], ...] = (
        ("path", dependant.path_params),
        ("query", dependant.query_params),
        ("header", dependant.header_params),
    )
    for source, fields in kinds:
        for field in fields:
            if not isinstance(field.field_info, params.Param) or _get_param_model(field):
                return None
            if _is_json_field(field) or _is_sequence(field):
                return None
            aliases = tuple(key for _, key in _get_param_aliases(field))
            found.append(_Param(field.name, source, field, aliases))
    return tuple(found)


def _is_sequence(field: ModelField) -> bool:
    from fastapi._compat.shared import field_annotation_is_sequence

    return bool(field_annotation_is_sequence(field.field_info.annotation))


def _body(route: APIRoute) -> tuple[str, ModelField] | Literal[False] | None:
    """The one body model, None for no body, False for what we leave to FastAPI
    (several body parameters, an embedded one, forms)."""
    fields = route.dependant.body_params
    if not fields:
        return None
    if len(fields) > 1 or route._embed_body_fields:
        return False
    field = fields[0]
    if isinstance(field.field_info, params.Form) or getattr(field.field_info, "embed", False):
        return False
    return field.name, field
