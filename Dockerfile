# The launcher service: jupyterhub-launcher run --config /etc/jupyterhub-launcher/config.yaml
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY schemas ./schemas
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home launcher
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config.yaml /etc/jupyterhub-launcher/config.yaml
USER 10001
ENTRYPOINT ["jupyterhub-launcher"]
CMD ["run", "--config", "/etc/jupyterhub-launcher/config.yaml"]
