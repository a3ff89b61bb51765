//! How the mirror reaches the master: the connections a fetch uses, opened so that it
//! costs what a `git fetch` of the same push does.
//!
//! - `git://`: a socket without Nagle's algorithm, whose reads and writes time out.
//! - `ssh://`: the ssh program's variant is taken from its name, as git does, instead of
//!   gix's probe, which runs `ssh -G` before every fetch when the command has arguments.
//! - `http(s)://`: one HTTP client for the mirror's lifetime, so its certificates are
//!   loaded and its connections opened once, not on every fetch.
//! - `file://` and local paths: gix's own connection (it runs `git-upload-pack`, as git does).

use std::ffi::OsStr;
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use gix::protocol::transport::client::blocking_io::http::{self, reqwest::Remote, GetResponse, Http, PostResponse};
use gix::protocol::transport::client::blocking_io::{ssh, Transport};
use gix::protocol::transport::client::git;
use gix::protocol::transport::Protocol;

/// A connection to the master, borrowing what it reuses from the mirror.
pub(super) type Connection<'a> = Box<dyn Transport + Send + 'a>;

/// Opens the connection of a fetch from `remote`, or `None` where gix's own is as fast
/// (`file://`). `client` is the mirror's HTTP client, lent to this fetch.
pub(super) fn open<'a>(
    remote: &gix::Remote<'_>,
    io_timeout: Duration,
    client: &'a mut LentClient<'_>,
) -> gix::Result<Option<Connection<'a>>> {
    let is_file = remote.url(gix::remote::Direction::Fetch).is_none_or(|url| url.scheme == gix::url::Scheme::File);
    if is_file {
        return Ok(None);
    }
    let (url, version) = remote.sanitized_url_and_version(gix::remote::Direction::Fetch)?;
    let connection: Connection<'a> = match url.scheme {
        gix::url::Scheme::Git => Box::new(git_daemon(url, version, io_timeout).map_err(gix::Error::from_error)?),
        gix::url::Scheme::Ssh => {
            let mut options = remote.repo().ssh_connect_options()?;
            if options.kind.is_none() {
                options.kind = ssh_variant(options.ssh_command(), options.disallow_shell);
            }
            Box::new(ssh::connect(url, version, options, false).map_err(gix::Error::from_error)?)
        }
        gix::url::Scheme::Http | gix::url::Scheme::Https => match client.remote() {
            Some(remote) => Box::new(http::connect_http(Borrowed(remote), url, version, false)),
            None => Box::new(http::connect::<Remote>(url, version, false)),
        },
        _ => return Ok(None),
    };
    Ok(Some(connection))
}

/// A `git://` connection whose socket reads and writes time out, so a black-holed
/// network fails the fetch instead of hanging it (gix only bounds the connect).
fn git_daemon(
    url: gix::Url,
    version: Protocol,
    io_timeout: Duration,
) -> std::io::Result<git::blocking_io::Connection<TcpStream, TcpStream>> {
    let invalid = |message: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, message);
    let host = url.host().ok_or_else(|| invalid("no host".into()))?.to_owned();
    let port = url.port;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port.unwrap_or(9418)))?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host} does not resolve")))?;
    let stream = TcpStream::connect_timeout(&addr, io_timeout)?;
    // gix writes each pkt-line of its request on its own; with Nagle's algorithm the
    // last of them waits for the server's delayed ACK (40 ms on Linux), twice per
    // fetch. A relay's sync of a one-line push over git:// took 138 ms at p50 with
    // it and takes 53 ms without (scripts/sync-over, BENCHMARKS.md).
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    let write = stream.try_clone()?;
    Ok(git::blocking_io::Connection::new(
        stream,
        write,
        version,
        url.path,
        Some((host, port)),
        git::ConnectMode::Daemon,
        false,
    ))
}

/// The ssh variant git infers from the program's name (`determine_ssh_variant` in
/// git's `connect.c`): OpenSSH for `ssh`. `None` leaves it to gix, which runs the
/// program with `-G` to find out, a process more on every fetch.
fn ssh_variant(command: &OsStr, is_program: bool) -> Option<ssh::ProgramKind> {
    let command = command.to_str()?;
    let program = if is_program { command.to_owned() } else { first_word(command)? };
    let name = std::path::Path::new(&program).file_name()?.to_str()?;
    let is_ssh = name.eq_ignore_ascii_case("ssh") || name.eq_ignore_ascii_case("ssh.exe");
    is_ssh.then_some(ssh::ProgramKind::Ssh)
}

/// The first word of a shell command line, its quotes removed (git's `split_cmdline`).
fn first_word(command: &str) -> Option<String> {
    let mut word = String::new();
    let mut quote = None;
    let mut chars = command.trim_start().chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => break,
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None | Some('"'), '\\') => word.push(chars.next()?),
            (_, c) => word.push(c),
        }
    }
    (quote.is_none() && !word.is_empty()).then_some(word)
}

/// The mirror's HTTP client, kept between fetches. Each fetch borrows it for its whole
/// length; one that finds it borrowed (by a fetch abandoned after its time limit) uses a
/// client of its own. A fetch that fails drops it, so that the next starts afresh.
#[derive(Clone, Default)]
pub(super) struct HttpClient(Arc<Mutex<Option<Remote>>>);

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient")
    }
}

impl HttpClient {
    /// The client for one fetch, if no other fetch has it.
    pub(super) fn lend(&self) -> LentClient<'_> {
        match self.0.try_lock() {
            Ok(guard) => LentClient(Some(guard)),
            // A fetch that panicked left the client in an unknown state: start afresh.
            Err(TryLockError::Poisoned(poisoned)) => {
                let mut guard = poisoned.into_inner();
                *guard = None;
                LentClient(Some(guard))
            }
            Err(TryLockError::WouldBlock) => LentClient(None),
        }
    }
}

/// The mirror's HTTP client while a fetch has it.
pub(super) struct LentClient<'a>(Option<MutexGuard<'a, Option<Remote>>>);

impl LentClient<'_> {
    /// The client, started on first use; `None` if another fetch has it.
    fn remote(&mut self) -> Option<&mut Remote> {
        self.0.as_mut().map(|guard| guard.get_or_insert_with(Remote::default))
    }

    /// Drops the client after a failed fetch: its connections or a redirect it
    /// followed may be what failed.
    pub(super) fn discard(&mut self) {
        if let Some(guard) = self.0.as_mut() {
            **guard = None;
        }
    }
}

/// [`Remote`] borrowed by one fetch's transport.
struct Borrowed<'a>(&'a mut Remote);

impl Http for Borrowed<'_> {
    type Headers = <Remote as Http>::Headers;
    type ResponseBody = <Remote as Http>::ResponseBody;
    type PostBody = <Remote as Http>::PostBody;

    fn get(
        &mut self,
        url: &str,
        base_url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> gix::Result<GetResponse<Self::Headers, Self::ResponseBody>> {
        self.0.get(url, base_url, headers)
    }

    fn post(
        &mut self,
        url: &str,
        base_url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
        body: http::PostBodyDataKind,
    ) -> gix::Result<PostResponse<Self::Headers, Self::ResponseBody, Self::PostBody>> {
        self.0.post(url, base_url, headers, body)
    }

    fn configure(&mut self, config: &dyn std::any::Any) -> gix::Result {
        self.0.configure(config)
    }

    fn redirected_base_url(&self) -> Option<String> {
        self.0.redirected_base_url()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ssh_variant_is_read_from_the_program_name_as_git_does() {
        let variant = |command: &str| ssh_variant(OsStr::new(command), false);
        assert_eq!(variant("ssh"), Some(ssh::ProgramKind::Ssh));
        assert_eq!(variant("ssh -i '/keys/it'\\''s.key' -o IdentitiesOnly=yes"), Some(ssh::ProgramKind::Ssh));
        assert_eq!(variant("/usr/bin/ssh -p 2222"), Some(ssh::ProgramKind::Ssh));
        assert_eq!(variant("\"/opt/open ssh/bin/ssh\" -v"), Some(ssh::ProgramKind::Ssh));
        assert_eq!(variant("  SSH.exe -v"), Some(ssh::ProgramKind::Ssh));
        // Anything else is left to gix's probe.
        assert_eq!(variant("/usr/local/bin/ssh-wrapper -i key"), None);
        assert_eq!(variant("plink -batch"), None);
        assert_eq!(variant("'unterminated ssh"), None);
        assert_eq!(variant(""), None);
        // GIT_SSH names a program, spaces and all.
        assert_eq!(ssh_variant(OsStr::new("/opt/my tools/ssh"), true), Some(ssh::ProgramKind::Ssh));
        assert_eq!(ssh_variant(OsStr::new("/opt/ssh -v"), true), None);
    }

    #[test]
    fn a_lent_client_is_kept_between_fetches_and_dropped_after_a_failure() {
        let client = HttpClient::default();
        let mut first = client.lend();
        let started: *const Remote = first.remote().expect("free");
        assert!(client.lend().remote().is_none(), "lent to one fetch at a time");
        drop(first);
        let mut second = client.lend();
        assert!(std::ptr::eq(second.remote().expect("free"), started), "the same client");
        second.discard();
        drop(second);
        assert!(client.0.lock().expect("lock").is_none(), "dropped after a failed fetch");
    }
}
