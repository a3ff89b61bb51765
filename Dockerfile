# confcast's binaries (publisher, post-receive, pre-receive, relay, subscriber) on a
# small Debian image with git, for compose.yaml and for running confcast in containers.
#
#   docker build -t confcast .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins \
      -p confcast-publisher -p confcast-hooks -p confcast-relay -p confcast-subscriber \
 && mkdir /out \
 && cp target/release/publisher target/release/post-receive target/release/pre-receive \
       target/release/relay target/release/subscriber /out/

FROM debian:bookworm-slim
# git: the master's repository and `git daemon`, and `git-upload-pack` for file:// masters.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
# The hooks call post-receive and pre-receive from the directory of `publisher`.
COPY --from=build /out/ /usr/local/bin/
COPY deploy/compose/master.sh /usr/local/bin/confcast-master
ENV RUST_LOG=info
