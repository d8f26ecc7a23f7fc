# Redis for compose.yaml where the public redis image cannot be pulled: Debian's
# redis-server (7.0, what ops/README.md installs on hosts) on the same base as the `is`
# image. Same user name ("redis") and command as the public image, so compose.yaml runs
# either unchanged. Built by scripts/compose-base.sh.
ARG BASE=is-base:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /etc/redis/redis.conf \
 && install -d -m 0755 /usr/local/etc/redis
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
