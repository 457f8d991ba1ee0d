//! Replays the attacks of issue 16 against a running mailmesh (`mailctl dev` or the
//! services as separate processes) and prints one verdict line per attack:
//! `PASS` when the platform held, `FAIL` when the attack worked (exit status 1).
//!
//! `loadtest/redteam.sh` starts both deployments, creates the accounts this program
//! expects and runs it against each; see there for the setup (tenants, users,
//! aliases, DNS records, the test MX the platform relays to).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use clap::Parser;
use mailmesh_kit::internal::{InternalTls, InternalTlsConfig, Role};
use mailmesh_proto::v1;
use mailmesh_proto::v1::auth_check_client::AuthCheckClient;
use mailmesh_proto::v1::directory_client::DirectoryClient;
use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser, Clone)]
#[command(about = "Replays issue 16's attacks against a running mailmesh")]
struct Args {
    /// Name printed on every verdict line (e.g. dev, distributed).
    #[arg(long)]
    label: String,
    /// MX port (25 in production).
    #[arg(long)]
    smtp: SocketAddr,
    /// Submission with implicit TLS (465).
    #[arg(long)]
    submissions: SocketAddr,
    /// IMAP with implicit TLS (993).
    #[arg(long)]
    imaps: SocketAddr,
    /// POP3 with implicit TLS (995).
    #[arg(long)]
    pop3s: SocketAddr,
    /// The storage gRPC endpoint.
    #[arg(long)]
    storage: String,
    /// The auth-check gRPC endpoint, when it runs as its own process.
    #[arg(long)]
    auth_check: Option<String>,
    /// The internal PKI (`mailctl pki init` layout): the identities a compromised
    /// pod would hold.
    #[arg(long)]
    pki: PathBuf,
    /// Where this program's test MX listens (the platform's outbound port).
    #[arg(long)]
    mx: SocketAddr,
    /// The platform's authserv-id (forged Authentication-Results name it).
    #[arg(long)]
    authserv_id: String,
    /// The command and pre-login deadlines the platform was started with (seconds).
    #[arg(long, default_value_t = 10)]
    deadline: u64,
    #[arg(long, default_value_t = 50)]
    smtp_per_ip: usize,
    #[arg(long, default_value_t = 100)]
    imap_per_ip: usize,
    #[arg(long, default_value_t = 50)]
    pop3_per_ip: usize,
    #[arg(long, default_value_t = 120)]
    imap_per_ip_per_minute: usize,
    /// imap.max_auth_failures.
    #[arg(long, default_value_t = 10)]
    max_auth_failures: usize,
    /// storage.login_max_failures.
    #[arg(long, default_value_t = 20)]
    storage_max_failures: usize,
    /// imap.max_sessions_per_user.
    #[arg(long, default_value_t = 50)]
    sessions_per_user: usize,
    /// First octet pair of the loopback addresses attacks come from (127.N.x.y),
    /// so runs against two deployments do not share counters.
    #[arg(long, default_value_t = 1)]
    net: u8,
    /// Process ids whose peak memory to report (name=pid).
    #[arg(long)]
    pid: Vec<String>,
    /// The process serving IMAP, whose memory 5.6 samples.
    #[arg(long)]
    imap_pid: Option<u32>,
    /// imap.max_fetch_memory (MiB).
    #[arg(long, default_value_t = 256)]
    fetch_memory_mib: u64,
    /// Only attacks whose id starts with this.
    #[arg(long)]
    only: Option<String>,
}

const IO_TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mx = TestMx::start(args.mx).await?;
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        mx,
        nonce: format!("{:x}", std::process::id() ^ now_ms() as u32),
        next_ip: Mutex::new(0),
    });
    type Attack = (
        &'static str,
        &'static str,
        fn(Arc<Ctx>) -> futures::future::BoxFuture<'static, anyhow::Result<String>>,
    );
    macro_rules! attack {
        ($id:literal, $what:literal, $f:ident) => {
            ($id, $what, |c| Box::pin($f(c)))
        };
    }
    let attacks: Vec<Attack> = vec![
        attack!(
            "1.1",
            "storage gRPC without a client certificate",
            grpc_plaintext
        ),
        attack!(
            "1.2",
            "storage gRPC with a certificate from another CA",
            grpc_strange_ca
        ),
        attack!(
            "1.3",
            "smtp-ingress identity resets a password",
            grpc_ingress_set_password
        ),
        attack!(
            "1.4",
            "smtp-ingress identity reads a DKIM private key",
            grpc_ingress_signing_key
        ),
        attack!(
            "1.5",
            "gateway identity reads a mailbox with no user session",
            grpc_gateway_no_session
        ),
        attack!(
            "1.6",
            "gateway identity reads alice's mail with bob's session",
            grpc_gateway_other_session
        ),
        attack!(
            "1.7",
            "Authenticate over gRPC, 3x the failure limit in parallel",
            grpc_brute_force
        ),
        attack!(
            "1.8",
            "auth-check gRPC: plaintext, and the gateway identity",
            grpc_auth_check
        ),
        attack!(
            "2.1",
            "2,500 nested multiparts on port 25, then FETCH/SEARCH",
            deep_mime
        ),
        attack!(
            "2.2",
            "a message whose parts mail-parser lists under themselves (found by fuzzing)",
            mime_cycle
        ),
        attack!(
            "3.1",
            "NUL in a header name on the MX (3 spellings)",
            nul_header_mx
        ),
        attack!(
            "3.2",
            "NUL in a header name on submission (From\\0: another user)",
            nul_header_submission
        ),
        attack!(
            "3.3",
            "no single From field (two, none) claiming a p=reject domain",
            from_count
        ),
        attack!(
            "3.4",
            "stored bytes altered when served (BODY[])",
            served_as_stored
        ),
        attack!(
            "4.1",
            "forged p=reject sender through a forwarding alias",
            forward_forged
        ),
        attack!(
            "4.2",
            "forwarded mail keeps the original envelope sender",
            forward_srs
        ),
        attack!(
            "4.3",
            "bounces to forged and to real SRS addresses",
            srs_bounces
        ),
        attack!(
            "5.1",
            "FETCH with BODY.PEEK[] x4000 on a 200 KB message",
            fetch_duplicates
        ),
        attack!(
            "5.2",
            "FETCH with 2,500 distinct 200 KB partials",
            fetch_budget
        ),
        attack!(
            "5.3",
            "LIST with a 60,000-character pattern over 996 mailboxes",
            list_pattern
        ),
        attack!(
            "5.4",
            "APPEND 64 MiB over quota, over the size limit, to no mailbox",
            append_prechecks
        ),
        attack!(
            "5.5",
            "more sessions for one user than allowed",
            sessions_per_user
        ),
        attack!(
            "5.6",
            "20 sessions at once FETCH two distinct items of a 10 MB message",
            fetch_memory
        ),
        attack!(
            "6.1",
            "SMTP connections from one address beyond the per-address cap",
            per_ip_smtp
        ),
        attack!(
            "6.2",
            "IMAP connections from one address beyond the per-address cap",
            per_ip_imap
        ),
        attack!(
            "6.3",
            "POP3 connections from one address beyond the per-address cap",
            per_ip_pop3
        ),
        attack!(
            "6.4",
            "one byte every 2 s on SMTP, IMAP and POP3 (trickled line)",
            trickle
        ),
        attack!("6.5", "IMAP connection flood from one address", imap_rate),
        attack!(
            "7.1",
            "forged Authentication-Results on both ports (5 spellings)",
            forged_results
        ),
        attack!(
            "7.2",
            "SMTP smuggling (<CRLF>.<CR><CR><LF>, bare LF dots)",
            smuggling
        ),
        attack!("7.3", "NUL bytes in a message body", nul_body),
        attack!(
            "7.4",
            "parallel password guessing; the real user's login after",
            login_limits
        ),
    ];
    let mut failed = 0;
    for (id, what, run) in attacks {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !id.starts_with(o.as_str()))
        {
            continue;
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(300), run(ctx.clone())).await;
        let secs = started.elapsed().as_secs_f64();
        let (verdict, detail) = match outcome {
            Ok(Ok(detail)) => ("PASS", detail),
            Ok(Err(e)) => {
                failed += 1;
                ("FAIL", format!("{e:#}"))
            }
            Err(_) => {
                failed += 1;
                ("FAIL", "no verdict within 300 s".to_owned())
            }
        };
        println!(
            "[{}] {verdict} {id} {what}: {detail} ({secs:.1} s)",
            args.label
        );
    }
    for p in &args.pid {
        if let Some((name, pid)) = p.split_once('=') {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let peak = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.trim_start_matches("VmHWM:").trim().to_owned())
                .unwrap_or_else(|| "gone".into());
            println!(
                "[{}] INFO peak RSS of {name} over the run: {peak}",
                args.label
            );
        }
    }
    if failed > 0 {
        println!("[{}] {failed} attack(s) succeeded", args.label);
        std::process::exit(1);
    }
    println!("[{}] every attack was held", args.label);
    Ok(())
}

struct Ctx {
    args: Args,
    mx: TestMx,
    nonce: String,
    next_ip: Mutex<u32>,
}

impl Ctx {
    /// A loopback address no earlier attack used (counters per address stay apart).
    fn fresh_ip(&self) -> IpAddr {
        let mut n = self.next_ip.lock().unwrap();
        *n += 1;
        let n = *n + 10;
        IpAddr::V4(Ipv4Addr::new(
            127,
            self.args.net,
            (n / 250) as u8,
            (n % 250 + 2) as u8,
        ))
    }

    fn tls(&self, role: Role) -> anyhow::Result<InternalTls> {
        Ok(InternalTls::load(
            &InternalTlsConfig::in_dir(&self.args.pki, role),
            role,
        )?)
    }

    async fn channel(&self, endpoint: &str, role: Role, server: Role) -> anyhow::Result<Channel> {
        let tls = self.tls(role)?;
        Ok(tls
            .connect(Endpoint::from_shared(endpoint.to_owned())?, server)
            .await?)
    }

    async fn storage(&self, role: Role) -> anyhow::Result<Channel> {
        self.channel(&self.args.storage, role, Role::Storage).await
    }

    async fn user(&self, address: &str) -> anyhow::Result<v1::UserRef> {
        let admin = DirectoryClient::new(self.storage(Role::Admin).await?)
            .get_user(v1::AddressRequest {
                address: address.into(),
            })
            .await?
            .into_inner();
        admin.user.context("no user")
    }

    /// An SMTP client on the MX port, greeted, after EHLO.
    async fn mx_session(&self, from: IpAddr) -> anyhow::Result<Client> {
        let mut c = Client::connect(from, self.args.smtp, false).await?;
        c.expect_smtp("220").await?;
        c.send(b"EHLO attacker.example\r\n").await?;
        c.expect_smtp("250").await?;
        Ok(c)
    }

    /// A submission client logged in as `user`.
    async fn submission(&self, user: &str, password: &str) -> anyhow::Result<Client> {
        let mut c = Client::connect(self.fresh_ip(), self.args.submissions, true).await?;
        c.expect_smtp("220").await?;
        c.send(b"EHLO attacker.example\r\n").await?;
        c.expect_smtp("250").await?;
        let plain =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        c.send(format!("AUTH PLAIN {plain}\r\n").as_bytes()).await?;
        c.expect_smtp("235").await?;
        Ok(c)
    }

    /// An IMAP session from a fresh address, logged in, INBOX selected.
    async fn imap(&self, user: &str, password: &str) -> anyhow::Result<Imap> {
        let mut s = Imap::connect(self.fresh_ip(), self.args.imaps).await?;
        s.ok(&format!("LOGIN {user} {password}")).await?;
        s.ok("SELECT INBOX").await?;
        Ok(s)
    }

    /// Waits until `user`'s INBOX holds a message whose Subject contains `subject`;
    /// its UIDs.
    async fn wait_for(
        &self,
        user: &str,
        password: &str,
        subject: &str,
    ) -> anyhow::Result<(Imap, Vec<u32>)> {
        let mut s = self.imap(user, password).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let uids = s.search(&format!("HEADER Subject \"{subject}\"")).await?;
            if !uids.is_empty() {
                return Ok((s, uids));
            }
            if Instant::now() > deadline {
                bail!("no message with subject {subject:?} reached {user}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.ok("NOOP").await?;
        }
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

fn code<T>(r: Result<T, tonic::Status>) -> Result<T, tonic::Code> {
    r.map_err(|s| s.code())
}

// ---------------------------------------------------------------- 1: internal APIs

async fn grpc_plaintext(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let url = ctx.args.storage.replace("https://", "http://");
    let channel = Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    list_tenants_refused(channel.map_err(Into::into), "a plaintext client").await
}

/// Lists the tenants over `channel`: refused is the verdict wanted.
async fn list_tenants_refused(
    channel: anyhow::Result<Channel>,
    who: &str,
) -> anyhow::Result<String> {
    let attempt = async {
        DirectoryClient::new(channel?)
            .list_tenants(v1::Empty {})
            .await?;
        anyhow::Ok(())
    };
    match attempt.await {
        Ok(()) => bail!("{who} listed the tenants"),
        Err(e) => Ok(format!("refused ({})", first_line(&format!("{e:#}")))),
    }
}

async fn grpc_strange_ca(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    mailmesh_kit::internal::write_pki(dir.path())?;
    let tls = InternalTls::load(
        &InternalTlsConfig::in_dir(dir.path(), Role::Admin),
        Role::Admin,
    )?;
    let channel = tls
        .connect(
            Endpoint::from_shared(ctx.args.storage.clone())?,
            Role::Storage,
        )
        .await;
    list_tenants_refused(
        channel.map_err(Into::into),
        "an admin certificate from a foreign CA",
    )
    .await
}

async fn grpc_ingress_set_password(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let mut d = DirectoryClient::new(ctx.storage(Role::SmtpIngress).await?);
    let r = d
        .set_password(v1::SetPasswordRequest {
            address: "alice@acme.test".into(),
            password: "taken-over".into(),
        })
        .await;
    let listed = d.list_tenants(v1::Empty {}).await;
    match (code(r), code(listed)) {
        (Err(tonic::Code::PermissionDenied), Err(tonic::Code::PermissionDenied)) => {
            Ok("SetPassword and ListTenants: PermissionDenied".into())
        }
        (a, b) => bail!(
            "SetPassword: {:?}, ListTenants: {:?}",
            a.map(drop),
            b.map(drop)
        ),
    }
}

async fn grpc_ingress_signing_key(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let alice = ctx.user("alice@acme.test").await?;
    let mut verdicts = Vec::new();
    for role in [Role::SmtpIngress, Role::Gateway, Role::DeliveryWorker] {
        let r = DirectoryClient::new(ctx.storage(role).await?)
            .get_signing_key(v1::DomainRequest {
                tenant: String::new(),
                domain: "acme.test".into(),
                user: Some(alice.clone()),
            })
            .await;
        match code(r) {
            Err(tonic::Code::PermissionDenied) => {
                verdicts.push(format!("{role}: PermissionDenied"))
            }
            other => bail!("{role} got {:?}", other.map(drop)),
        }
    }
    // Submission may sign, but only for a user with a session.
    let r = DirectoryClient::new(ctx.storage(Role::Submission).await?)
        .get_signing_key(v1::DomainRequest {
            tenant: String::new(),
            domain: "acme.test".into(),
            user: Some(alice),
        })
        .await;
    match code(r) {
        Err(c @ (tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)) => {
            verdicts.push(format!("submission without a session: {c:?}"))
        }
        other => bail!("submission without a session got {:?}", other.map(drop)),
    }
    Ok(verdicts.join(", "))
}

async fn grpc_gateway_no_session(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let alice = ctx.user("alice@acme.test").await?;
    let mut m = MailboxesClient::new(ctx.storage(Role::Gateway).await?);
    let listed = m.list_mailboxes(alice.clone()).await;
    let fetched = m
        .list_messages(v1::MailboxRequest {
            user: Some(alice.clone()),
            mailbox: "INBOX".into(),
        })
        .await;
    let forged = v1::UserRef {
        session: "AAAA.forged".into(),
        ..alice
    };
    let with_forged = m.list_mailboxes(forged).await;
    for (what, r) in [
        ("ListMailboxes", code(listed.map(drop))),
        ("ListMessages", code(fetched.map(drop))),
        (
            "ListMailboxes with a forged token",
            code(with_forged.map(drop)),
        ),
    ] {
        match r {
            Err(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {}
            other => bail!("{what}: {other:?}"),
        }
    }
    Ok("ListMailboxes, ListMessages and a forged token: refused".into())
}

async fn grpc_gateway_other_session(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let alice = ctx.user("alice@acme.test").await?;
    let mut d = DirectoryClient::new(ctx.storage(Role::Gateway).await?);
    let bob = d
        .authenticate(v1::AuthenticateRequest {
            address: "bob@acme.test".into(),
            password: "bob-pw".into(),
            client_ip: ctx.fresh_ip().to_string(),
        })
        .await?
        .into_inner();
    let bob_ref = bob
        .user
        .and_then(|u| u.user)
        .context("bob did not log in")?;
    let mut m = MailboxesClient::new(ctx.storage(Role::Gateway).await?);
    // Bob's own session works (so the refusal below is about whose it is).
    m.list_mailboxes(bob_ref.clone())
        .await
        .context("bob's own mailboxes")?;
    let as_alice = v1::UserRef {
        session: bob_ref.session.clone(),
        ..alice
    };
    match code(m.list_mailboxes(as_alice).await) {
        Err(c @ (tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)) => {
            Ok(format!("bob's token works for bob, for alice: {c:?}"))
        }
        other => bail!("alice's mailboxes with bob's token: {:?}", other.map(drop)),
    }
}

async fn grpc_brute_force(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let limit = ctx.args.storage_max_failures;
    let attacker = ctx.fresh_ip().to_string();
    let channel = ctx.storage(Role::Gateway).await?;
    let mut tasks = Vec::new();
    for i in 0..limit * 3 {
        let mut d = DirectoryClient::new(channel.clone());
        let ip = attacker.clone();
        tasks.push(tokio::spawn(async move {
            d.authenticate(v1::AuthenticateRequest {
                address: "carol@acme.test".into(),
                password: format!("guess-{i}"),
                client_ip: ip,
            })
            .await
            .map(|r| r.into_inner().ok)
        }));
    }
    let (mut checked, mut throttled) = (0, 0);
    for t in tasks {
        match t.await? {
            Ok(false) => checked += 1,
            Ok(true) => bail!("a guess logged in"),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                ) =>
            {
                throttled += 1
            }
            Err(s) => bail!("unexpected answer: {s}"),
        }
    }
    if checked > limit {
        bail!("{checked} guesses checked (limit {limit})");
    }
    let mut d = DirectoryClient::new(channel);
    let right = |ip: String| v1::AuthenticateRequest {
        address: "carol@acme.test".into(),
        password: "carol-pw".into(),
        client_ip: ip,
    };
    let from_attacker = code(
        d.authenticate(right(attacker))
            .await
            .map(|r| r.into_inner().ok),
    );
    if matches!(from_attacker, Ok(true)) {
        bail!("the attacker's address still gets answers after {checked} failures");
    }
    let clean = code(
        d.authenticate(right(ctx.fresh_ip().to_string()))
            .await
            .map(|r| r.into_inner().ok),
    );
    if clean != Ok(true) {
        bail!("carol's own login from a clean address: {clean:?}");
    }
    Ok(format!(
        "{} guesses: {checked} checked, {throttled} throttled; then the right password from the attacker: {from_attacker:?}, from a clean address: logged in",
        limit * 3
    ))
}

async fn grpc_auth_check(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let Some(endpoint) = ctx.args.auth_check.clone() else {
        return Ok("auth-check runs inside this process (no port to attack)".into());
    };
    let plain = async {
        let channel = Endpoint::from_shared(endpoint.replace("https://", "http://"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await?;
        AuthCheckClient::new(channel)
            .check_client(v1::CheckClientRequest::default())
            .await?;
        anyhow::Ok(())
    };
    if plain.await.is_ok() {
        bail!("a plaintext client was served");
    }
    let channel = ctx
        .channel(&endpoint, Role::Gateway, Role::AuthCheck)
        .await?;
    match code(
        AuthCheckClient::new(channel)
            .check_client(v1::CheckClientRequest::default())
            .await,
    ) {
        Err(tonic::Code::PermissionDenied) => {
            Ok("plaintext refused; gateway identity: PermissionDenied".into())
        }
        other => bail!("gateway identity: {:?}", other.map(drop)),
    }
}

// ---------------------------------------------------------------- 2: MIME depth

async fn deep_mime(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    const LEVELS: usize = 2_500;
    let subject = format!("deep-mime-{}", ctx.nonce);
    let mut m = format!(
        "From: someone@example.org\r\nTo: alice@acme.test\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
    );
    for i in 0..LEVELS {
        m.push_str(&format!(
            "Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"
        ));
    }
    m.push_str("Content-Type: text/plain\r\n\r\nneedle\r\n");
    for i in (0..LEVELS).rev() {
        m.push_str(&format!("--b{i}--\r\n"));
    }
    let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
    c.transaction(
        "someone@example.org",
        &["alice@acme.test"],
        m.as_bytes(),
        "250",
    )
    .await?;
    let (mut s, uids) = ctx
        .wait_for("alice@acme.test", "alice-pw", &subject)
        .await?;
    let uid = uids[0];
    let mut replies = Vec::new();
    for items in [
        "BODYSTRUCTURE",
        "BODY",
        "ENVELOPE RFC822.SIZE",
        "BODY.PEEK[]",
        "BODY.PEEK[1.1.1.1.1]",
        "BODY.PEEK[1.1.1.1.1.MIME]",
        "BINARY.PEEK[1]",
        "BINARY.SIZE[1]",
    ] {
        let (tagged, bytes) = s.command(&format!("UID FETCH {uid} ({items})")).await?;
        if !tagged.contains(" OK ") && !tagged.contains(" NO ") && !tagged.contains(" BAD ") {
            bail!("{items}: {tagged}");
        }
        replies.push(format!("{items} {} ({bytes} B)", word(&tagged, 1)));
    }
    let (tagged, _) = s.command("UID SEARCH BODY needle").await?;
    replies.push(format!("SEARCH BODY {}", word(&tagged, 1)));
    // The gateway still serves everyone.
    let mut other = Imap::connect(ctx.fresh_ip(), ctx.args.imaps).await?;
    other.ok("LOGIN bob@acme.test bob-pw").await?;
    other.ok("NOOP").await?;
    Ok(format!("{} ; the gateway still serves", replies.join(", ")))
}

/// The `mime_fetch` fuzzer's find: on broken boundaries mail-parser lists a part
/// under itself and under the root, and BODYSTRUCTURE grew by two at every level
/// (5 KB, 4 GB). Its NULs become spaces (the MX refuses NUL); the cycle stays
/// (checked with mail-parser).
async fn mime_cycle(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let fuzzed = include_bytes!("../../services/imap-pop3-gateway/tests/data/mime-cycle.eml");
    let subject = format!("mime-cycle-{}", ctx.nonce);
    let mut m = format!("Subject: {subject}\r\nTo: alice@acme.test\r\n").into_bytes();
    // The fuzzer's first line has junk before its From field; the rest is kept.
    let from = fuzzed
        .windows(5)
        .position(|w| w == b"From:")
        .context("the fixture's From field")?;
    m.extend(
        fuzzed[from..]
            .iter()
            .map(|&b| if b == 0 { b' ' } else { b }),
    );
    let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
    let reply = c
        .transaction("someone@example.org", &["alice@acme.test"], &m, "")
        .await?;
    if !reply.starts_with("250") {
        return Ok(format!("not accepted: {}", first_line(&reply)));
    }
    let (mut s, uids) = ctx
        .wait_for("alice@acme.test", "alice-pw", &subject)
        .await?;
    let started = Instant::now();
    let (tagged, bytes) = s
        .command(&format!("UID FETCH {} (BODYSTRUCTURE BODY)", uids[0]))
        .await?;
    if !tagged.contains(" OK ") {
        bail!("{}", tagged.trim_end());
    }
    let mut other = Imap::connect(ctx.fresh_ip(), ctx.args.imaps).await?;
    other.ok("LOGIN bob@acme.test bob-pw").await?;
    Ok(format!(
        "BODYSTRUCTURE and BODY: {bytes} B in {} ms; the gateway still serves",
        started.elapsed().as_millis()
    ))
}

// ---------------------------------------------------------------- 3: NUL, From

async fn nul_header_mx(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for name in [&b"From\0"[..], b"Fr\0om", b"\0From"] {
        let mut m = Vec::new();
        m.extend_from_slice(name);
        m.extend_from_slice(
            b": alice@acme.test\r\nTo: bob@acme.test\r\nSubject: nul\r\n\r\nhi\r\n",
        );
        let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
        let reply = c
            .transaction("alice@acme.test", &["bob@acme.test"], &m, "5")
            .await
            .with_context(|| format!("{:?}", String::from_utf8_lossy(name)))?;
        out.push(first_line(&reply).to_owned());
    }
    Ok(format!("refused at DATA: {}", dedup(out)))
}

async fn nul_header_submission(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let mut c = ctx.submission("mallory@acme.test", "mallory-pw").await?;
    let m = b"From\0: alice@acme.test\r\nTo: bob@acme.test\r\nSubject: from alice, really\r\n\r\nhi\r\n";
    let reply = c
        .transaction("mallory@acme.test", &["bob@acme.test"], m, "5")
        .await?;
    Ok(format!("refused at DATA: {}", first_line(&reply)))
}

async fn from_count(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let mut out = Vec::new();
    for (what, headers) in [
        (
            "two From",
            "From: ceo@corp.test\r\nFrom: someone@example.org\r\n",
        ),
        ("no From", "Sender: ceo@corp.test\r\n"),
    ] {
        let m = format!("{headers}To: alice@acme.test\r\nSubject: from count\r\n\r\nhi\r\n");
        let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
        let reply = c
            .transaction("ceo@corp.test", &["alice@acme.test"], m.as_bytes(), "5")
            .await
            .context(what)?;
        out.push(format!("{what}: {}", first_line(&reply)));
    }
    Ok(out.join("; "))
}

async fn served_as_stored(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let subject = format!("verbatim-{}", ctx.nonce);
    let body = format!(
        "From: someone@example.org\r\nTo: alice@acme.test\r\nSubject: {subject}\r\nX-Odd:  two spaces \t\r\n\r\ncaf\u{e9} \u{2603}\r\n\x7f\x01 controls\r\n..dot-stuffed line\r\n\t tab\r\n"
    );
    let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
    c.transaction(
        "someone@example.org",
        &["alice@acme.test"],
        body.as_bytes(),
        "250",
    )
    .await?;
    let (mut s, uids) = ctx
        .wait_for("alice@acme.test", "alice-pw", &subject)
        .await?;
    let got = s
        .fetch_literal(&format!("UID FETCH {} BODY.PEEK[]", uids[0]))
        .await?;
    // What the MX unstuffs: the one leading dot.
    let expected = body.replace("\r\n..dot", "\r\n.dot");
    if !got.ends_with(expected.as_bytes()) {
        bail!(
            "served differently: {:?}",
            String::from_utf8_lossy(&got[got.len().saturating_sub(expected.len())..])
        );
    }
    Ok(format!(
        "{} bytes served, the sender's {} at their end byte for byte",
        got.len(),
        expected.len()
    ))
}

// ---------------------------------------------------------------- 4: forwarding

async fn forward_forged(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let subject = format!("forged-forward-{}", ctx.nonce);
    let m = format!(
        "From: CEO <ceo@corp.test>\r\nTo: fwd@evil.test\r\nSubject: {subject}\r\n\r\nwire the money\r\n"
    );
    let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
    let reply = c
        .transaction("ceo@corp.test", &["fwd@evil.test"], m.as_bytes(), "")
        .await?;
    // A marker after it: once the marker is forwarded, the forgery would have been.
    let marker = format!("marker-{}", ctx.nonce);
    let honest = format!(
        "From: someone@example.org\r\nTo: fwd@evil.test\r\nSubject: {marker}\r\n\r\nhi\r\n"
    );
    c.transaction(
        "someone@example.org",
        &["fwd@evil.test"],
        honest.as_bytes(),
        "250",
    )
    .await?;
    ctx.mx
        .wait(|m| contains(&m.data, &marker), Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    if ctx.mx.any(|m| contains(&m.data, &subject)) {
        bail!("the forgery was forwarded");
    }
    Ok(format!(
        "MX: {}; not forwarded (a later message was)",
        first_line(&reply)
    ))
}

async fn forward_srs(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let subject = format!("honest-forward-{}", ctx.nonce);
    let m = format!(
        "From: Bob <bob@example.org>\r\nTo: fwd@evil.test\r\nSubject: {subject}\r\n\r\nhello\r\n"
    );
    let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
    c.transaction("bob@example.org", &["fwd@evil.test"], m.as_bytes(), "250")
        .await?;
    let got = ctx
        .mx
        .wait(|m| contains(&m.data, &subject), Duration::from_secs(60))
        .await?;
    if !(got.mail_from.starts_with("SRS0=") && got.mail_from.ends_with("@evil.test")) {
        bail!("relayed with MAIL FROM:<{}>", got.mail_from);
    }
    if !got.data.starts_with(b"ARC-Seal: i=1;") {
        bail!(
            "no ARC set at the top: {:?}",
            first_line(&String::from_utf8_lossy(&got.data))
        );
    }
    Ok(format!(
        "relayed as MAIL FROM:<{}>, ARC-Seal i=1 on top",
        got.mail_from
    ))
}

async fn srs_bounces(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    // The SRS address bob@example.org's mail was forwarded with (4.2).
    let honest = format!("honest-forward-{}", ctx.nonce);
    if !ctx.mx.any(|m| contains(&m.data, &honest)) {
        forward_srs(ctx.clone()).await?;
    }
    let srs = ctx
        .mx
        .find(|m| contains(&m.data, &honest))
        .context("no forwarded message")?
        .mail_from;
    let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
    c.send(b"MAIL FROM:<>\r\n").await?;
    c.expect_smtp("250").await?;
    // Forged: a made-up hash; tampered: the real one naming another user.
    let (head, tail) = srs.split_once('@').context("SRS address")?;
    let forged = format!("SRS0=AAAA=7D=example.org=ceo@{tail}");
    let tampered = format!("{}x@{tail}", head);
    let mut refused = Vec::new();
    for bad in [&forged, &tampered] {
        c.send(format!("RCPT TO:<{bad}>\r\n").as_bytes()).await?;
        let r = c.smtp_reply().await?;
        if !r.starts_with('5') {
            bail!("RCPT TO:<{bad}>: {r}");
        }
        refused.push(first_line(&r).to_owned());
    }
    c.send(format!("RCPT TO:<{srs}>\r\n").as_bytes()).await?;
    c.expect_smtp("250").await?;
    let subject = format!("bounce-{}", ctx.nonce);
    c.send(b"DATA\r\n").await?;
    c.expect_smtp("354").await?;
    c.send(
        format!("From: MAILER-DAEMON@remote.test\r\nSubject: {subject}\r\n\r\ngone\r\n.\r\n")
            .as_bytes(),
    )
    .await?;
    c.expect_smtp("250").await?;
    let back = ctx
        .mx
        .wait(|m| contains(&m.data, &subject), Duration::from_secs(60))
        .await?;
    if back.recipients != ["bob@example.org"] || !back.mail_from.is_empty() {
        bail!(
            "the bounce went to {:?} from <{}>",
            back.recipients,
            back.mail_from
        );
    }
    Ok(format!(
        "forged and tampered: {}; the real one reached <bob@example.org> as a bounce",
        dedup(refused)
    ))
}

// ---------------------------------------------------------------- 5: amplification

/// Delivers a 200 KB message to bob (once per run); its UID.
async fn big_message(ctx: &Ctx) -> anyhow::Result<(Imap, u32, usize)> {
    let subject = format!("big-{}", ctx.nonce);
    let m = filler(&subject, 200_000);
    let (s, uids) = match ctx
        .wait_for_quick("bob@acme.test", "bob-pw", &subject)
        .await?
    {
        Some(found) => found,
        None => ctx.deliver_to_bob(&subject, &m).await?,
    };
    Ok((s, uids[0], m.len()))
}

/// A message to bob of at least `bytes` bytes of plain lines.
fn filler(subject: &str, bytes: usize) -> String {
    let mut m =
        format!("From: someone@example.org\r\nTo: bob@acme.test\r\nSubject: {subject}\r\n\r\n");
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    m.push_str(&line.repeat(bytes.saturating_sub(m.len()).div_ceil(line.len())));
    m
}

impl Ctx {
    /// Sends `message` to bob through the MX from a stranger and waits until it is
    /// in his INBOX.
    async fn deliver_to_bob(
        &self,
        subject: &str,
        message: &str,
    ) -> anyhow::Result<(Imap, Vec<u32>)> {
        let mut c = self.mx_session(self.fresh_ip()).await?;
        c.transaction(
            "someone@example.org",
            &["bob@acme.test"],
            message.as_bytes(),
            "250",
        )
        .await?;
        self.wait_for("bob@acme.test", "bob-pw", subject).await
    }

    async fn wait_for_quick(
        &self,
        user: &str,
        password: &str,
        subject: &str,
    ) -> anyhow::Result<Option<(Imap, Vec<u32>)>> {
        let mut s = self.imap(user, password).await?;
        let uids = s.search(&format!("HEADER Subject \"{subject}\"")).await?;
        Ok((!uids.is_empty()).then_some((s, uids)))
    }
}

async fn fetch_duplicates(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let (mut s, uid, size) = big_message(&ctx).await?;
    let items = vec!["BODY.PEEK[]"; 4000].join(" ");
    let (tagged, bytes) = s.command(&format!("UID FETCH {uid} ({items})")).await?;
    if !tagged.contains(" OK ") {
        bail!("{tagged}");
    }
    if bytes > 2 * size + 65_536 {
        bail!("{bytes} bytes of reply for a {size}-byte message");
    }
    Ok(format!(
        "{bytes} bytes of reply for a {size}-byte message (was 800 MB)"
    ))
}

async fn fetch_budget(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let (mut s, uid, _) = big_message(&ctx).await?;
    let items: Vec<String> = (0..2_500)
        .map(|i| format!("BODY.PEEK[]<{i}.199000>"))
        .collect();
    let (tagged, bytes) = s
        .command(&format!("UID FETCH {uid} ({})", items.join(" ")))
        .await?;
    if !tagged.contains("NO [LIMIT]") {
        bail!("{} ({bytes} bytes)", tagged.trim_end());
    }
    Ok(format!("{} after {} MB", tagged.trim_end(), bytes >> 20))
}

async fn list_pattern(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let mut s = Imap::connect(ctx.fresh_ip(), ctx.args.imaps).await?;
    s.ok("LOGIN erin@acme.test erin-pw").await?;
    let (status, _) = s.command("STATUS \"box989\" (MESSAGES)").await?;
    if !status.contains(" OK ") {
        // Up to the 1,000 a user may have (six exist), pipelined.
        let mut pipelined = Vec::new();
        for i in 0..990 {
            pipelined.extend_from_slice(format!("c{i} CREATE \"box{i}\"\r\n").as_bytes());
        }
        s.c.send(&pipelined).await?;
        let mut done = 0;
        while done < 990 {
            let line = s.c.line().await?;
            if line.starts_with('c') && line.contains(" OK") {
                done += 1;
            } else if line.starts_with('c') {
                bail!("CREATE: {line}");
            }
        }
    }
    let long = "%*".repeat(30_000);
    let (huge, _) = s.command(&format!("LIST \"\" \"{long}\"")).await?;
    if !huge.contains(" BAD ") && !huge.contains(" NO ") {
        bail!("a 60,000-character pattern was matched: {huge}");
    }
    // Within the limit: wildcard runs collapse, matching is linear; another session
    // is answered meanwhile.
    let near = format!("box{}9", "%*".repeat(500));
    let mut other = Imap::connect(ctx.fresh_ip(), ctx.args.imaps).await?;
    other.ok("LOGIN bob@acme.test bob-pw").await?;
    let t = Instant::now();
    let list = format!("LIST \"\" \"{near}\"");
    let listing = s.command(&list);
    let probe = async {
        let t = Instant::now();
        other.ok("NOOP").await?;
        anyhow::Ok(t.elapsed())
    };
    let (listed, noop) = tokio::join!(listing, probe);
    let (tagged, bytes) = listed?;
    let took = t.elapsed();
    if !tagged.contains(" OK ") {
        bail!("1,000-character pattern: {tagged}");
    }
    let noop = noop?;
    if noop > Duration::from_secs(1) {
        bail!("another session waited {noop:?} for NOOP");
    }
    Ok(format!(
        "60,000 chars: {}; 1,000 chars of %* over 996 mailboxes: OK in {} ms ({bytes} B), another session's NOOP in {} ms",
        word(&huge, 1),
        took.as_millis(),
        noop.as_millis()
    ))
}

async fn append_prechecks(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let mut s = Imap::connect(ctx.fresh_ip(), ctx.args.imaps).await?;
    s.ok("LOGIN mallory@acme.test mallory-pw").await?;
    let mut out = Vec::new();
    for (what, cmd, expect) in [
        (
            "64 MiB over a 1 MB quota",
            "a1 APPEND INBOX {67108864}\r\n",
            "OVERQUOTA",
        ),
        ("64 MiB + 1", "a2 APPEND INBOX {67108865}\r\n", "TOOBIG"),
        ("to no mailbox", "a3 APPEND Nowhere {10}\r\n", "TRYCREATE"),
    ] {
        s.c.send(cmd.as_bytes()).await?;
        let line = s.c.line().await?;
        if line.starts_with('+') {
            bail!("{what}: the literal was invited ({})", line.trim_end());
        }
        if !line.contains(expect) {
            bail!("{what}: {}", line.trim_end());
        }
        out.push(format!("{what}: {}", line[3..].trim_end()));
    }
    Ok(format!("refused before +: {}", out.join("; ")))
}

async fn sessions_per_user(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let max = ctx.args.sessions_per_user;
    let mut held = Vec::new();
    for _ in 0..max {
        let mut s = Imap::connect(ctx.fresh_ip(), ctx.args.imaps).await?;
        s.ok("LOGIN frank@acme.test frank-pw").await?;
        held.push(s);
    }
    let mut extra = Imap::connect(ctx.fresh_ip(), ctx.args.imaps).await?;
    let (tagged, _) = extra.command("LOGIN frank@acme.test frank-pw").await?;
    if !tagged.contains("NO [UNAVAILABLE]") {
        bail!("session {} of one user: {tagged}", max + 1);
    }
    drop(held);
    Ok(format!(
        "{max} sessions held, the next: {}",
        tagged.trim_end()
    ))
}

async fn fetch_memory(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    const SESSIONS: usize = 20;
    let subject = format!("huge-{}", ctx.nonce);
    let m = filler(&subject, 10_000_000);
    let (_, uids) = ctx.deliver_to_bob(&subject, &m).await?;
    let uid = uids[0];
    let rss = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
    };
    let baseline = ctx.args.imap_pid.and_then(rss);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = ctx.args.imap_pid.map(|pid| {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kb) = rss(pid) {
                    peak.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        let mut s = Imap::connect(ctx.fresh_ip(), ctx.args.imaps).await?;
        s.ok("LOGIN bob@acme.test bob-pw").await?;
        s.ok("SELECT INBOX").await?;
        sessions.push(s);
    }
    let started = Instant::now();
    let fetches = sessions.into_iter().map(|mut s| {
        tokio::spawn(async move {
            s.command(&format!("UID FETCH {uid} (BODY.PEEK[] BODY.PEEK[TEXT])"))
                .await
        })
    });
    let mut total = 0;
    for f in fetches {
        let (tagged, bytes) = f.await??;
        if !tagged.contains(" OK ") {
            bail!("{}", tagged.trim_end());
        }
        if bytes < 2 * m.len() - 1000 {
            bail!(
                "a reply of {bytes} bytes for two items of {} bytes",
                m.len()
            );
        }
        total += bytes;
    }
    let took = started.elapsed();
    if let Some(s) = sampler {
        s.abort();
    }
    let memory = match baseline {
        Some(base) => {
            let grown_mib = peak
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(base)
                / 1024;
            // Before: every session held the message and both copies, 20 × 30 MB.
            if grown_mib > ctx.args.fetch_memory_mib + 128 {
                bail!("the IMAP process grew by {grown_mib} MiB");
            }
            format!(
                ", the IMAP process grew by {grown_mib} MiB at most (budget {} MiB)",
                ctx.args.fetch_memory_mib
            )
        }
        None => String::new(),
    };
    Ok(format!(
        "{} MB served in {:.1} s, every reply whole{memory}",
        total / 1_000_000,
        took.as_secs_f64()
    ))
}

// ---------------------------------------------------------------- 6: slots, trickling

/// Holds `cap` connections from one address to `port`; the next one from it must be
/// refused and one from another address served. `greeting` says how a served
/// connection starts.
async fn per_ip(
    ctx: &Ctx,
    port: SocketAddr,
    tls: bool,
    cap: usize,
    greeting: &str,
) -> anyhow::Result<String> {
    let ip = ctx.fresh_ip();
    let mut held = Vec::new();
    for i in 0..cap {
        let mut c = Client::connect(ip, port, tls)
            .await
            .with_context(|| format!("connection {i}"))?;
        let line = c.line().await.with_context(|| format!("greeting {i}"))?;
        if !line.starts_with(greeting) {
            bail!("connection {i} of {cap} refused early: {}", line.trim_end());
        }
        held.push(c);
    }
    let refused = match Client::connect(ip, port, tls).await {
        Err(e) => format!("closed ({e})"),
        Ok(mut c) => match c.line().await {
            Ok(line) if line.starts_with(greeting) => {
                bail!("connection {} from one address served", cap + 1)
            }
            Ok(line) => line.trim_end().to_owned(),
            Err(e) => format!("closed ({})", first_line(&format!("{e:#}"))),
        },
    };
    let mut other = Client::connect(ctx.fresh_ip(), port, tls).await?;
    let line = other.line().await?;
    if !line.starts_with(greeting) {
        bail!("another address was refused too: {}", line.trim_end());
    }
    drop(held);
    Ok(format!(
        "{cap} held; the next: {refused}; another address: served"
    ))
}

async fn per_ip_smtp(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    per_ip(&ctx, ctx.args.smtp, false, ctx.args.smtp_per_ip, "220").await
}

async fn per_ip_imap(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    per_ip(&ctx, ctx.args.imaps, true, ctx.args.imap_per_ip, "* OK").await
}

async fn per_ip_pop3(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    per_ip(&ctx, ctx.args.pop3s, true, ctx.args.pop3_per_ip, "+OK").await
}

/// Sends `line` one byte every 2 s after the greeting; how long until the server
/// hung up (an error when it is still there after twice the deadline).
async fn trickle_one(
    from: IpAddr,
    port: SocketAddr,
    tls: bool,
    line: &[u8],
    deadline: Duration,
) -> anyhow::Result<Duration> {
    let mut c = Client::connect(from, port, tls).await?;
    c.line().await?;
    let started = Instant::now();
    for b in line.iter().cycle() {
        if started.elapsed() > deadline * 2 + Duration::from_secs(5) {
            bail!("still connected after {:?}", started.elapsed());
        }
        if c.send(&[*b]).await.is_err() {
            return Ok(started.elapsed());
        }
        // Whatever the server says, it must then close.
        if let Ok(true) = tokio::time::timeout(Duration::from_secs(2), c.peek_closed()).await {
            return Ok(started.elapsed());
        }
    }
    unreachable!()
}

async fn trickle(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let d = Duration::from_secs(ctx.args.deadline);
    let (smtp, imap, pop3) = tokio::join!(
        trickle_one(
            ctx.fresh_ip(),
            ctx.args.smtp,
            false,
            b"EHLO slowly.example.org",
            d
        ),
        trickle_one(
            ctx.fresh_ip(),
            ctx.args.imaps,
            true,
            b"a LOGIN alice@acme.test alice-pw",
            d
        ),
        trickle_one(
            ctx.fresh_ip(),
            ctx.args.pop3s,
            true,
            b"USER alice@acme.test",
            d
        ),
    );
    Ok(format!(
        "closed after SMTP {:.0} s, IMAP {:.0} s, POP3 {:.0} s (deadline {} s; before: never)",
        smtp.context("SMTP")?.as_secs_f64(),
        imap.context("IMAP")?.as_secs_f64(),
        pop3.context("POP3")?.as_secs_f64(),
        ctx.args.deadline
    ))
}

async fn imap_rate(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let ip = ctx.fresh_ip();
    let limit = ctx.args.imap_per_ip_per_minute;
    let mut served = 0;
    for _ in 0..limit + 10 {
        let mut c = match Client::connect(ip, ctx.args.imaps, true).await {
            Ok(c) => c,
            Err(_) => break,
        };
        match c.line().await {
            Ok(l) if l.starts_with("* OK") => served += 1,
            _ => break,
        }
    }
    if served > limit {
        bail!("{served} connections in a row served (limit {limit}/min)");
    }
    let mut other = Client::connect(ctx.fresh_ip(), ctx.args.imaps, true).await?;
    if !other.line().await?.starts_with("* OK") {
        bail!("another address was refused");
    }
    Ok(format!(
        "{served} served, then refused; another address: served"
    ))
}

// ---------------------------------------------------------------- 7: smaller holes

async fn forged_results(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let id = &ctx.args.authserv_id;
    let forged = [
        format!("Authentication-Results: {id}; dmarc=pass header.from=spoofed-1.example"),
        format!("Authentication-Results: {id}.; dkim=pass header.d=spoofed-2.example"),
        format!("Authentication-Results: {id}\\; spf=pass smtp.mailfrom=spoofed-3.example"),
        format!("ARC-Authentication-Results: i=1; {id}; dmarc=pass header.from=spoofed-4.example"),
        format!("authentication-results:(c) {id} ; dkim=pass header.d=spoofed-5.example"),
    ]
    .join("\r\n");
    let subject = format!("forged-ar-{}", ctx.nonce);
    let mx = format!(
        "{forged}\r\nFrom: someone@example.org\r\nTo: bob@acme.test\r\nSubject: {subject}-mx\r\n\r\nhi\r\n"
    );
    let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
    c.transaction(
        "someone@example.org",
        &["bob@acme.test"],
        mx.as_bytes(),
        "250",
    )
    .await?;
    let sub = format!(
        "{forged}\r\nFrom: alice@acme.test\r\nTo: bob@acme.test\r\nSubject: {subject}-sub\r\n\r\nhi\r\n"
    );
    let mut c = ctx.submission("alice@acme.test", "alice-pw").await?;
    c.transaction("alice@acme.test", &["bob@acme.test"], sub.as_bytes(), "250")
        .await?;
    for port in ["mx", "sub"] {
        let (mut s, uids) = ctx
            .wait_for("bob@acme.test", "bob-pw", &format!("{subject}-{port}"))
            .await?;
        let header = s
            .fetch_literal(&format!("UID FETCH {} BODY.PEEK[HEADER]", uids[0]))
            .await?;
        if contains(&header, "spoofed-") {
            bail!(
                "{port}: a forged result survived:\n{}",
                String::from_utf8_lossy(&header)
            );
        }
    }
    Ok("all 5 stripped on the MX and on submission".into())
}

async fn smuggling(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let subject = format!("smuggle-{}", ctx.nonce);
    let mut out = Vec::new();
    for (i, end) in ["\r\n.\r\r\n", "\n.\n", "\r\n.\n", "\n.\r\n"]
        .iter()
        .enumerate()
    {
        let m = format!(
            "From: someone@example.org\r\nTo: alice@acme.test\r\nSubject: {subject}-{i}\r\n\r\ncarrier{end}MAIL FROM:<ceo@corp.test>\r\nRCPT TO:<alice@acme.test>\r\nDATA\r\nFrom: ceo@corp.test\r\nSubject: smuggled-{}-{i}\r\n\r\nx\r\n",
            ctx.nonce
        );
        let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
        let reply = c
            .transaction(
                "someone@example.org",
                &["alice@acme.test"],
                m.as_bytes(),
                "",
            )
            .await?;
        // Exactly one reply: the next command is answered as a command.
        c.send(b"NOOP\r\n").await?;
        let next = c.smtp_reply().await?;
        if !next.starts_with("250") {
            bail!("after the data, NOOP got {next}");
        }
        out.push(format!("{:?}: {}", end, &reply[..3]));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut s = ctx.imap("alice@acme.test", "alice-pw").await?;
    let smuggled = s
        .search(&format!("HEADER Subject \"smuggled-{}\"", ctx.nonce))
        .await?;
    if !smuggled.is_empty() {
        bail!("{} smuggled message(s) delivered", smuggled.len());
    }
    Ok(format!(
        "one message each, nothing smuggled ({})",
        out.join(", ")
    ))
}

async fn nul_body(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let m = b"From: someone@example.org\r\nTo: alice@acme.test\r\nSubject: nul body\r\n\r\nbefore\0after\r\n";
    let mut c = ctx.mx_session(ctx.fresh_ip()).await?;
    let reply = c
        .transaction("someone@example.org", &["alice@acme.test"], m, "5")
        .await?;
    Ok(format!("refused at DATA: {}", first_line(&reply)))
}

async fn login_limits(ctx: Arc<Ctx>) -> anyhow::Result<String> {
    let attacker = ctx.fresh_ip();
    let port = ctx.args.imaps;
    let mut tasks = Vec::new();
    for i in 0..100 {
        tasks.push(tokio::spawn(async move {
            let mut s = Imap::connect(attacker, port).await?;
            let (tagged, _) = s.command(&format!("LOGIN dave@acme.test guess{i}")).await?;
            anyhow::Ok(tagged)
        }));
    }
    let (mut checked, mut throttled, mut other) = (0, 0, 0);
    for t in tasks {
        match t.await? {
            Ok(l) if l.contains("AUTHENTICATIONFAILED") => checked += 1,
            Ok(l) if l.contains("UNAVAILABLE") => throttled += 1,
            Ok(l) if l.contains(" OK ") => bail!("a guess logged in"),
            _ => other += 1,
        }
    }
    let limit = ctx.args.max_auth_failures;
    if checked > limit {
        bail!("{checked} of 100 parallel guesses checked (limit {limit})");
    }
    let mut s = Imap::connect(ctx.fresh_ip(), port).await?;
    let t = Instant::now();
    let (tagged, _) = s.command("LOGIN dave@acme.test dave-pw").await?;
    let took = t.elapsed();
    if !tagged.contains(" OK ") {
        bail!("dave's own login from a clean address: {tagged}");
    }
    if took > Duration::from_secs(3) {
        bail!("dave's own login took {took:?} (the account penalty)");
    }
    Ok(format!(
        "100 parallel guesses: {checked} checked, {throttled} throttled, {other} cut; dave from another address: logged in in {} ms",
        took.as_millis()
    ))
}

// ---------------------------------------------------------------- clients

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A line-oriented client over TCP or TLS from a chosen source address.
struct Client {
    io: BufReader<Box<dyn Stream>>,
}

impl Client {
    async fn connect(from: IpAddr, to: SocketAddr, tls: bool) -> anyhow::Result<Self> {
        let socket = if to.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(from, 0))?;
        let tcp = tokio::time::timeout(IO_TIMEOUT, socket.connect(to)).await??;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Stream> = if tls {
            let connector =
                tokio_rustls::TlsConnector::from(mailmesh_kit::tls::opportunistic_client_config());
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost")?;
            Box::new(tokio::time::timeout(IO_TIMEOUT, connector.connect(name, tcp)).await??)
        } else {
            Box::new(tcp)
        };
        Ok(Self {
            io: BufReader::new(io),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await?;
        Ok(())
    }

    async fn line(&mut self) -> anyhow::Result<String> {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(IO_TIMEOUT, self.io.read_until(b'\n', &mut buf)).await??;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// True once the server has closed (what it said before is discarded).
    async fn peek_closed(&mut self) -> bool {
        let mut buf = [0u8; 512];
        loop {
            match self.io.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    }

    async fn smtp_reply(&mut self) -> anyhow::Result<String> {
        let mut all = String::new();
        loop {
            let line = self.line().await?;
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return Ok(all);
            }
        }
    }

    async fn expect_smtp(&mut self, code: &str) -> anyhow::Result<String> {
        let r = self.smtp_reply().await?;
        if !r.starts_with(code) {
            bail!("expected {code}, got {}", r.trim_end());
        }
        Ok(r)
    }

    /// One mail transaction; the reply to the end of data, which must start with
    /// `expect` (an error reply earlier is returned when `expect` is an error class).
    async fn transaction(
        &mut self,
        from: &str,
        to: &[&str],
        message: &[u8],
        expect: &str,
    ) -> anyhow::Result<String> {
        self.send(format!("MAIL FROM:<{from}>\r\n").as_bytes())
            .await?;
        let r = self.smtp_reply().await?;
        if !r.starts_with('2') {
            return check(r, expect, "MAIL");
        }
        for rcpt in to {
            self.send(format!("RCPT TO:<{rcpt}>\r\n").as_bytes())
                .await?;
            let r = self.smtp_reply().await?;
            if !r.starts_with('2') {
                return check(r, expect, "RCPT");
            }
        }
        self.send(b"DATA\r\n").await?;
        self.expect_smtp("354").await?;
        let mut data = message.to_vec();
        if !data.ends_with(b"\r\n") {
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b".\r\n");
        self.send(&data).await?;
        let r = self.smtp_reply().await?;
        check(r, expect, "end of data")
    }
}

fn check(reply: String, expect: &str, at: &str) -> anyhow::Result<String> {
    if reply.starts_with(expect) {
        Ok(reply)
    } else {
        bail!("at {at}: expected {expect}…, got {}", reply.trim_end())
    }
}

/// An IMAP session over implicit TLS.
struct Imap {
    c: Client,
    tag: u32,
}

impl Imap {
    async fn connect(from: IpAddr, to: SocketAddr) -> anyhow::Result<Self> {
        let mut c = Client::connect(from, to, true).await?;
        let greeting = c.line().await?;
        if !greeting.starts_with("* OK") {
            bail!("greeting: {}", greeting.trim_end());
        }
        Ok(Self { c, tag: 0 })
    }

    /// Sends a command; its tagged reply line and the bytes of the whole reply
    /// (literals skipped, not kept).
    async fn command(&mut self, command: &str) -> anyhow::Result<(String, usize)> {
        self.tag += 1;
        let tag = format!("t{} ", self.tag);
        self.c
            .send(format!("{tag}{command}\r\n").as_bytes())
            .await?;
        let mut bytes = 0;
        loop {
            let line = self.c.line().await?;
            bytes += line.len();
            if line.starts_with(&tag) {
                return Ok((line, bytes));
            }
            if let Some(n) = literal_len(&line) {
                let mut rest = n;
                let mut buf = vec![0u8; 64 << 10];
                while rest > 0 {
                    let k = rest.min(buf.len());
                    tokio::time::timeout(IO_TIMEOUT, self.c.io.read_exact(&mut buf[..k])).await??;
                    rest -= k;
                }
                bytes += n;
            }
        }
    }

    async fn ok(&mut self, command: &str) -> anyhow::Result<()> {
        let (tagged, _) = self.command(command).await?;
        if tagged.split_whitespace().nth(1) != Some("OK") {
            bail!("{command}: {}", tagged.trim_end());
        }
        Ok(())
    }

    async fn search(&mut self, criteria: &str) -> anyhow::Result<Vec<u32>> {
        self.tag += 1;
        let tag = format!("t{} ", self.tag);
        self.c
            .send(format!("{tag}UID SEARCH {criteria}\r\n").as_bytes())
            .await?;
        let mut uids = Vec::new();
        loop {
            let line = self.c.line().await?;
            if let Some(rest) = line.strip_prefix("* SEARCH") {
                uids.extend(
                    rest.split_whitespace()
                        .filter_map(|u| u.parse::<u32>().ok()),
                );
            } else if line.starts_with(&tag) {
                if !line.contains(" OK ") {
                    bail!("SEARCH: {}", line.trim_end());
                }
                return Ok(uids);
            }
        }
    }

    /// The first literal of a FETCH reply.
    async fn fetch_literal(&mut self, command: &str) -> anyhow::Result<Vec<u8>> {
        self.tag += 1;
        let tag = format!("t{} ", self.tag);
        self.c
            .send(format!("{tag}{command}\r\n").as_bytes())
            .await?;
        let mut found = None;
        loop {
            let line = self.c.line().await?;
            if line.starts_with(&tag) {
                return found
                    .with_context(|| format!("{command}: no literal ({})", line.trim_end()));
            }
            if let Some(n) = literal_len(&line) {
                let mut buf = vec![0u8; n];
                tokio::time::timeout(IO_TIMEOUT, self.c.io.read_exact(&mut buf)).await??;
                found.get_or_insert(buf);
            }
        }
    }
}

/// `{N}` or `~{N}` at the end of a line.
fn literal_len(line: &str) -> Option<usize> {
    let l = line.trim_end_matches(['\r', '\n']);
    let open = l.rfind('{')?;
    l.ends_with('}')
        .then(|| l[open + 1..l.len() - 1].trim_end_matches('+').parse().ok())?
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim_end()
}

fn word(s: &str, n: usize) -> String {
    s.split_whitespace().nth(n).unwrap_or("").to_owned()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn dedup(v: Vec<String>) -> String {
    v.into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join(" | ")
}

// ---------------------------------------------------------------- the test MX

#[derive(Clone, Debug)]
struct Received {
    mail_from: String,
    recipients: Vec<String>,
    data: Vec<u8>,
}

/// The remote MX the platform relays forwarded mail and bounces to: accepts
/// everything, keeps what it got.
#[derive(Clone)]
struct TestMx {
    got: Arc<Mutex<Vec<Received>>>,
}

impl TestMx {
    async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("test MX on {addr}"))?;
        let got = Arc::new(Mutex::new(Vec::new()));
        let mx = Self { got: got.clone() };
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let got = got.clone();
                tokio::spawn(async move {
                    let _ = serve_mx(tcp, got).await;
                });
            }
        });
        Ok(mx)
    }

    fn find(&self, f: impl Fn(&Received) -> bool) -> Option<Received> {
        self.got.lock().unwrap().iter().find(|m| f(m)).cloned()
    }

    fn any(&self, f: impl Fn(&Received) -> bool) -> bool {
        self.find(f).is_some()
    }

    async fn wait(
        &self,
        f: impl Fn(&Received) -> bool,
        within: Duration,
    ) -> anyhow::Result<Received> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(m) = self.find(&f) {
                return Ok(m);
            }
            if Instant::now() > deadline {
                bail!("the test MX received nothing matching within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn serve_mx(
    tcp: tokio::net::TcpStream,
    got: Arc<Mutex<Vec<Received>>>,
) -> anyhow::Result<()> {
    let mut io = BufReader::new(tcp);
    io.write_all(b"220 mx.remote.test ESMTP\r\n").await?;
    let mut current = Received {
        mail_from: String::new(),
        recipients: Vec::new(),
        data: Vec::new(),
    };
    loop {
        let mut line = String::new();
        if io.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250-mx.remote.test\r\n250 8BITMIME\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            current.mail_from = angle(&line);
            current.recipients.clear();
            b"250 2.1.0 ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            current.recipients.push(angle(&line));
            b"250 2.1.5 ok\r\n"
        } else if upper.starts_with("DATA") {
            io.write_all(b"354 go ahead\r\n").await?;
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                if io.read_until(b'\n', &mut l).await? == 0 {
                    return Ok(());
                }
                if l == b".\r\n" {
                    break;
                }
                data.extend_from_slice(l.strip_prefix(b".".as_slice()).unwrap_or(&l));
            }
            current.data = data;
            got.lock().unwrap().push(current.clone());
            b"250 2.0.0 queued\r\n"
        } else if upper.starts_with("QUIT") {
            io.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"250 ok\r\n"
        };
        io.write_all(reply).await?;
    }
}

fn angle(line: &str) -> String {
    let start = line.find('<').map_or(0, |i| i + 1);
    let end = line[start..].find('>').map_or(line.len(), |i| start + i);
    line[start..end].to_owned()
}
