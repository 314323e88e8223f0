# The pubrun server image, for building where a registry is reachable:
#   docker build -t pubrun --build-arg PUBRUN_GIT_COMMIT=$(git rev-parse --short=10 HEAD) .
#   docker run -d -p 8085:8085 -v pubrun-data:/data pubrun serve --token-file /run/secrets/pubrun-token
# scripts/server-image.sh builds an image configured the same way (user,
# volume, port, health check, entry point) from a local binary, without
# any registry.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# .git is not in the build context (.dockerignore): pass the commit in.
ARG PUBRUN_GIT_COMMIT=unknown
ENV PUBRUN_GIT_COMMIT=${PUBRUN_GIT_COMMIT}
RUN cargo build --release --locked -p pubrun \
 && install -m 0755 target/release/pubrun /pubrun

FROM debian:bookworm-slim
# ca-certificates: webhooks, push subscriptions and GCE pools speak HTTPS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin pubrun \
 && install -d -o pubrun -g pubrun -m 0750 /data
COPY --from=build /pubrun /usr/local/bin/pubrun
USER 10001:10001
WORKDIR /data
VOLUME /data
ENV PUBRUN_DATA_DIR=/data \
    PUBRUN_LISTEN=0.0.0.0:8085
EXPOSE 8085
# `pubrun healthcheck` GETs /healthz on 127.0.0.1:8085 (no curl in the image).
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/pubrun", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/pubrun"]
# Listening beyond loopback needs a token: add --token-file FILE (or set
# PUBRUN_TOKEN / PUBRUN_TOKEN_FILE).
CMD ["serve"]
