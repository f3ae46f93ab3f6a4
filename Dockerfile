# One image with backer-server, backer-agent, backer-operator and backer.
# Build: docker build -t backer:latest .   (e2e/kind.sh does it)
FROM rust:1.90-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p backer-server -p backer-agent -p backer-operator -p backer-cli

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/backer-server /src/target/release/backer-agent \
     /src/target/release/backer-operator /src/target/release/backer /usr/local/bin/
