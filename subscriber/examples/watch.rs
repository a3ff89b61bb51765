//! Watches one service's configuration and prints each change: what an application
//! embedding `confcast_subscriber::client` does.
//!
//! From the host's subscriber (`subscriber --listen 127.0.0.1:7070 ...`):
//!
//! ```text
//! cargo run -p confcast-subscriber --example watch -- --listen 127.0.0.1:7070 service0
//! ```
//!
//! Straight from the datacenter's NATS, checking the relay's signatures:
//!
//! ```text
//! cargo run -p confcast-subscriber --example watch -- --nats nats://127.0.0.1:4222 --dc dc1 \
//!     [--trusted-key KEY] service0
//! ```

use std::process::ExitCode;

use confcast_schemas::Kind;
use confcast_subscriber::client::{self, ClientError, File, ServiceConfig};
use futures::{Stream, StreamExt};

fn usage() -> ExitCode {
    eprintln!("usage: watch (--listen ADDR | --nats URL --dc DC [--trusted-key KEY]...) SERVICE");
    ExitCode::from(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut nats, mut dc, mut keys, mut service) = (None, None, None, Vec::new(), None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next(),
            "--nats" => nats = args.next(),
            "--dc" => dc = args.next(),
            "--trusted-key" => keys.extend(args.next()),
            _ if service.is_none() && !arg.starts_with('-') => service = Some(arg),
            _ => return usage(),
        }
    }
    let Some(service) = service else { return usage() };
    let changes: std::pin::Pin<Box<dyn Stream<Item = Result<ServiceConfig, ClientError>>>> = match (listen, nats, dc) {
        (Some(listen), None, None) => match listen.parse() {
            Ok(listen) => Box::pin(client::watch_local(listen, &service)),
            Err(e) => {
                eprintln!("watch: --listen: {e}");
                return ExitCode::from(2);
            }
        },
        (None, Some(url), Some(dc)) => match async_nats::connect(url.as_str()).await {
            Ok(nats) => Box::pin(client::watch_nats(nats, &dc, Kind::Service, &service, &keys)),
            Err(e) => {
                eprintln!("watch: {url}: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => return usage(),
    };
    let mut changes = changes;
    while let Some(change) = changes.next().await {
        match change {
            Ok(config) => {
                println!("{} at {}", config.name, config.commit.as_deref().unwrap_or("(removed)"));
                for (path, file) in &config.files {
                    let what = match file {
                        File::Text { document: Some(_), .. } => "document",
                        File::Text { .. } => "text",
                        File::Binary(_) => "binary",
                        File::Symlink(_) => "symlink",
                    };
                    println!("  {path} ({what}, {} bytes)", file.bytes().len());
                }
            }
            Err(e) => eprintln!("watch: {e}"),
        }
    }
    ExitCode::SUCCESS
}
