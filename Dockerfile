# buildshuttle's own image: a Rust build stage, and a runtime stage that holds only the
# stripped binary on a distroless-style "cc" base (glibc, libgcc, the CA bundle, a passwd entry
# for 10001; no shell, no package manager). Base images are build args so the image builds
# where only local base images exist: .ci/image makes the runtime base from Debian packages
# and replaces the builder stage with a prebuilt binary.
ARG BUILDER_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILDER_IMAGE} AS builder
WORKDIR /src
COPY . .
# A builder image may bring a prebuilt /out/buildshuttle (used where nothing can be pulled);
# otherwise the binary is compiled here.
RUN if [ ! -x /out/buildshuttle ]; then \
      apt-get update && apt-get install -y --no-install-recommends cmake && \
      cargo build --release --locked --bin buildshuttle && \
      mkdir -p /out && strip --strip-all -o /out/buildshuttle target/release/buildshuttle; \
    fi && mkdir -p /out/data

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /out/buildshuttle /usr/local/bin/buildshuttle
# DATA_DIR, writable by the service user (local mode; a volume usually goes here).
COPY --from=builder --chown=10001:10001 /out/data /var/lib/buildshuttle
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    DATA_DIR=/var/lib/buildshuttle
# Non-root by default. Local mode with the node's docker socket needs the socket's group
# (the Helm chart and the worker pod builder set it); external mode talks TCP/TLS.
USER 10001:10001
EXPOSE 9000
ENTRYPOINT ["/usr/local/bin/buildshuttle"]
CMD ["serve"]
