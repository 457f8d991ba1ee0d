//! Zero-loss rolling restarts behind a load balancer, without a cluster: two
//! smtp-ingress and two delivery-worker processes on the real Kafka, S3 and Redis,
//! HAProxy in front sending PROXY protocol v2, and a client (Python's smtplib, four
//! connections from 127.0.0.2) sending messages (at least two thousand, to eight
//! mailboxes) for as long as every ingress and then every delivery worker is being
//! restarted with SIGTERM, one by one (a worker once every worker is ready). Every
//! message answered `250` must land exactly once; the client may see `4xx` and retry,
//! never `5xx`; the client address the MX records is the real one, not the balancer's.
//! Then readers (Python's imaplib, from 127.0.0.2) go through the same balancer to two
//! gateway processes while each gateway is restarted: every pass over the mailboxes
//! sees every message, and a failed login is counted for the real client address.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::processes::{
    Process, acme_with_users, backends, gateway_env, spawn, spawn_haproxy, spawn_storage,
    uuid_like, wait_for,
};
use futures::StreamExt;
use mailmesh_proto::v1;
use mailmesh_proto::v1::mailboxes_client::MailboxesClient;
use mailmesh_testkit::{backend_env, free_port};

/// The client sends at least this many, and goes on until every process was restarted.
const AT_LEAST: usize = 2000;
const CONNECTIONS: usize = 4;
const USERS: usize = 8;

/// The admin address a process was given (`MAILMESH_ADMIN__LISTEN`).
fn admin_of(env: &[(&str, String)]) -> String {
    env.iter()
        .find(|(k, _)| *k == "MAILMESH_ADMIN__LISTEN")
        .map(|(_, v)| v.clone())
        .expect("an admin address")
}

/// Whether a worker's log shows `groups` consumer groups, each settled since its
/// last rebalance began (workers log both with `group=`). Readiness alone can answer
/// 200 in the moment after start-up before the consumers exist.
fn groups_settled(log: &str, groups: usize) -> bool {
    let mut last = std::collections::HashMap::new();
    for line in log.lines() {
        let settled = line.contains("consumer group settled");
        if !settled && !line.contains("consumer group rebalancing") {
            continue;
        }
        if let Some(group) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("group="))
        {
            last.insert(group.trim_matches('"').to_owned(), settled);
        }
    }
    last.len() >= groups && last.values().all(|&s| s)
}

/// Whether `/readyz` on `admin` answers 200 (what a readiness probe asks).
fn ready(admin: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = [0u8; 12];
    s.write_all(b"GET /readyz HTTP/1.0\r\n\r\n").is_ok()
        && s.read_exact(&mut head).is_ok()
        && head.ends_with(b" 200")
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_behind_haproxy_lose_and_duplicate_nothing() {
    let run = format!("roll{}", uuid_like());
    let grpc = free_port();
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let topic = format!("{run}.mail");

    let storage = spawn_storage(&run, grpc);

    let ingress_env = |port: u16| {
        let mut env = backends(&run);
        env.push(("MAILMESH_LISTEN", format!("127.0.0.1:{port}")));
        env.push(("MAILMESH_STORAGE_ENDPOINT", endpoint.clone()));
        env.push(("MAILMESH_SMTP__TOPIC", topic.clone()));
        env.push(("MAILMESH_SMTP__TOPIC_PARTITIONS", "4".into()));
        env.push(("MAILMESH_SMTP__HOSTNAME", "mx.acme.test".into()));
        env.push(("MAILMESH_SMTP__PROXY__TRUSTED", "[\"127.0.0.1/32\"]".into()));
        // One client address sends everything here.
        env.push(("MAILMESH_SMTP__CONNECTIONS_PER_IP_PER_MINUTE", "0".into()));
        env.push(("MAILMESH_CACHE__REDIS__URL", backend_env("MMTEST_REDIS")));
        env.push(("MAILMESH_CACHE__REDIS__KEY_PREFIX", format!("{run}:")));
        env
    };
    let worker_env = || {
        let mut env = backends(&run);
        env.push(("MAILMESH_STORAGE_ENDPOINT", endpoint.clone()));
        env.push(("MAILMESH_WORKER__TOPIC", topic.clone()));
        env.push(("MAILMESH_WORKER__TOPIC_PARTITIONS", "4".into()));
        env.push(("MAILMESH_WORKER__GROUP", format!("{run}.workers")));
        env.push((
            "MAILMESH_WORKER__RETRY_PREFIX",
            format!("{run}/local-retry"),
        ));
        // Its own outbound group too: the default name is shared with every other
        // test's workers on the same broker, whose comings and goings would rebalance
        // (and, on tansu, can wedge) this test's group.
        env.push(("MAILMESH_OUTBOUND__GROUP", format!("{run}.outbound")));
        env.push(("MAILMESH_WORKER__HOSTNAME", "mx.acme.test".into()));
        if let Ok(debug) = std::env::var("ROLL_KAFKA_DEBUG") {
            env.push(("MAILMESH_QUEUE__KAFKA__PROPERTIES__DEBUG", debug));
            env.push((
                "MAILMESH_TELEMETRY__LOG_LEVEL",
                "info,rdkafka=debug,librdkafka=debug".into(),
            ));
        }
        env
    };
    let ports = [free_port(), free_port()];
    let mut ingresses: Vec<Process> = ports
        .iter()
        .map(|&p| spawn("smtp-ingress", &ingress_env(p)))
        .collect();
    let worker_envs: Vec<_> = (0..2).map(|_| worker_env()).collect();
    let mut worker_admins: Vec<String> = worker_envs.iter().map(|e| admin_of(e)).collect();
    let mut workers: Vec<Process> = worker_envs
        .iter()
        .map(|e| spawn("delivery-worker", e))
        .collect();
    // Two gateways behind the same balancer, for the readers.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = mailmesh_kit::tls::ensure_self_signed(dir.path(), &["localhost"]).unwrap();
    let gateway_env = |imap: u16| {
        let mut env = gateway_env(&run, imap, &endpoint, (&cert, &key));
        env.push(("MAILMESH_PROXY__TRUSTED", "[\"127.0.0.1/32\"]".into()));
        env
    };
    let imap_ports = [free_port(), free_port()];
    let mut gateways: Vec<Process> = imap_ports
        .iter()
        .map(|&p| spawn("imap-pop3-gateway", &gateway_env(p)))
        .collect();

    // HAProxy: round robin, PROXY v2 to the backends (and on its health checks),
    // a backend that stops answering is taken out within a check interval.
    let front = free_port();
    let imap_front = free_port();
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  maxconn 512\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
             timeout client 60s\n  timeout server 60s\n  retries 3\n  option redispatch\n\
             frontend smtp\n  bind 127.0.0.1:{front}\n  default_backend ingress\n\
             backend ingress\n  balance roundrobin\n\
               server s1 127.0.0.1:{} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 2\n\
               server s2 127.0.0.1:{} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 2\n\
             frontend imap\n  bind 127.0.0.1:{imap_front}\n  default_backend gateway\n\
             backend gateway\n  balance leastconn\n\
               server g1 127.0.0.1:{} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 2\n\
               server g2 127.0.0.1:{} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 2\n",
            ports[0], ports[1], imap_ports[0], imap_ports[1]
        ),
    )
    .unwrap();
    let haproxy = spawn_haproxy(&config);

    // Several mailboxes, so deliveries spread over the storage log's partitions.
    let addresses: Vec<String> = (0..USERS).map(|u| format!("user{u}@acme.test")).collect();
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    let (channel, users, _) = acme_with_users(&storage, &endpoint, &addresses).await;
    let mailboxes = MailboxesClient::new(channel);
    for port in ports
        .into_iter()
        .chain([front, imap_front])
        .chain(imap_ports)
    {
        wait_for("the front doors listening", &[&haproxy], || async move {
            listening(port).then_some(())
        })
        .await;
    }

    let stop = dir.path().join("stop");
    let stop = stop.display().to_string();
    // The client: like an MTA, it retries a message after a 4xx or a dropped
    // connection, and gives up on nothing else.
    let script = format!(
        r#"
import smtplib, threading, time, sys, os
N, C, U, STOP = {AT_LEAST}, {CONNECTIONS}, {USERS}, {stop:?}
sent = [0]
results = {{'ok': 0, 'retries': 0, 'fatal': []}}
lock = threading.Lock()
def connect():
    while True:
        try:
            s = smtplib.SMTP('127.0.0.1', {front}, timeout=60, source_address=('127.0.0.2', 0))
            s.ehlo('client.example.org')
            return s
        except (OSError, smtplib.SMTPException):
            with lock: results['retries'] += 1
            time.sleep(0.1)
def more():
    with lock:
        if sent[0] >= N and os.path.exists(STOP):
            return None
        sent[0] += 1
        return sent[0] - 1
def sender(k):
    s = connect()
    while True:
        i = more()
        if i is None:
            break
        msg = ('Subject: roll-%d\r\nFrom: bob@example.org\r\nMessage-ID: <%d@example.org>\r\n\r\nbody %d\r\n' % (i, i, i)).encode()
        while True:
            try:
                s.sendmail('bob@example.org', ['user%d@acme.test' % (i % U)], msg)
                with lock: results['ok'] += 1
                # About 200 messages a second in all: checking each one afterwards
                # stays short.
                time.sleep(0.02)
                break
            except smtplib.SMTPResponseException as e:
                if 400 <= e.smtp_code < 500:
                    with lock: results['retries'] += 1
                    try: s.close()
                    except Exception: pass
                    s = connect()
                else:
                    with lock: results['fatal'].append((i, e.smtp_code, e.smtp_error))
                    break
            except smtplib.SMTPRecipientsRefused as e:
                codes = [c for c, _ in e.recipients.values()]
                if all(400 <= c < 500 for c in codes):
                    with lock: results['retries'] += 1
                    s = connect()
                else:
                    with lock: results['fatal'].append((i, codes))
                    break
            except (OSError, smtplib.SMTPServerDisconnected):
                with lock: results['retries'] += 1
                s = connect()
    try: s.quit()
    except Exception: pass
threads = [threading.Thread(target=sender, args=(k,)) for k in range(C)]
[t.start() for t in threads]
[t.join() for t in threads]
print(results['ok'], results['retries'], results['fatal'])
"#
    );
    let started = std::time::Instant::now();
    let client = Command::new("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Roll every ingress, then every worker, while the client sends.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, port) in ports.into_iter().enumerate() {
        let status = ingresses[i].terminate(Duration::from_secs(60));
        assert!(
            status.success(),
            "ingress {i} exit: {status}\n{}",
            ingresses[i].log()
        );
        ingresses[i] = spawn("smtp-ingress", &ingress_env(port));
        wait_for(
            "a restarted ingress listening",
            &[&ingresses[i]],
            || async move { listening(port).then_some(()) },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut retired = Vec::new();
    // Each worker is stopped only once every current worker is ready, as a Deployment
    // waits for readiness: a worker's /readyz fails until both of its consumer groups
    // (local delivery and outbound) have settled and while they rebalance. tansu (the
    // CI broker) never recovers a group whose leader leaves mid-rebalance (it keeps
    // naming the departed leader; ROLL_KAFKA_DEBUG=cgrp shows the group protocol).
    for i in 0..workers.len() {
        let (admins, all) = (&worker_admins, &workers);
        wait_for(
            "every worker ready (consumer groups settled)",
            &workers.iter().collect::<Vec<_>>(),
            || async move {
                let settled = all.iter().all(|w| groups_settled(&w.log(), 2));
                (settled && admins.iter().all(|a| ready(a))).then_some(())
            },
        )
        .await;
        let worker = &mut workers[i];
        let status = worker.terminate(Duration::from_secs(150));
        assert!(
            status.success(),
            "worker {i} exit: {status}\n{}",
            worker.log()
        );
        let env = worker_env();
        worker_admins[i] = admin_of(&env);
        let old = std::mem::replace(worker, spawn("delivery-worker", &env));
        retired.push(old);
    }
    let rolled = started.elapsed();
    std::fs::write(&stop, b"").unwrap();

    let out = tokio::task::spawn_blocking(move || client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<&str> = said.split_whitespace().collect();
    assert!(
        fields.len() == 3 && fields[2] == "[]",
        "the client saw a permanent failure: {said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let accepted: usize = fields[0].parse().unwrap();
    assert!(accepted >= AT_LEAST, "{said}");
    eprintln!(
        "{accepted} messages accepted in {:?} ({} retries after 4xx or a dropped connection); \
         restarts done after {rolled:?}",
        started.elapsed(),
        fields[1]
    );

    // Every accepted message lands, once.
    let mut logs: Vec<&Process> = vec![&storage, &haproxy];
    logs.extend(ingresses.iter());
    logs.extend(workers.iter());
    logs.extend(retired.iter());
    // Every user's INBOX listing, in one list of (user, message).
    let listing = || {
        let mailboxes = mailboxes.clone();
        let users = users.clone();
        async move {
            let mut all = Vec::new();
            for user in users {
                let listed = mailboxes
                    .clone()
                    .list_messages(v1::MailboxRequest {
                        user: Some(user.clone()),
                        mailbox: "INBOX".into(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .messages;
                all.extend(listed.into_iter().map(|m| (user.clone(), m)));
            }
            Some(all)
        }
    };
    // Delivery goes on while it makes progress; a stall fails with the counts.
    let mut last = (0, std::time::Instant::now());
    let listed = loop {
        let now = listing().await.unwrap_or_default();
        if now.len() >= accepted {
            break now;
        }
        if now.len() > last.0 {
            eprintln!("{:?}: {} delivered", started.elapsed(), now.len());
            last = (now.len(), std::time::Instant::now());
        }
        if last.1.elapsed() > Duration::from_secs(150) {
            let logs: Vec<String> = logs.iter().map(|p| p.log()).collect();
            panic!(
                "delivery stalled at {} of {accepted}; logs:\n{}",
                now.len(),
                logs.join("\n-----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("all delivered after {:?}", started.elapsed());
    // Late duplicates would show up after a moment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listed = listing().await.unwrap_or(listed);
    assert_eq!(listed.len(), accepted, "duplicates in the INBOXes");
    let mut subjects = std::collections::BTreeSet::new();
    let mut seen_client = String::new();
    for (user, m) in &listed {
        let mut stream = mailboxes
            .clone()
            .fetch(v1::FetchRequest {
                user: Some(user.clone()),
                mailbox: "INBOX".into(),
                uid: m.uid,
                start: 0,
                end: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let mut text = Vec::new();
        while let Some(chunk) = stream.next().await {
            text.extend(chunk.unwrap().data);
        }
        let text = String::from_utf8(text).unwrap();
        let subject = text
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap()
            .to_owned();
        subjects.insert(subject);
        if seen_client.is_empty() {
            seen_client = text
                .lines()
                .find(|l| l.starts_with("Received: "))
                .unwrap()
                .to_owned();
        }
    }
    assert_eq!(subjects.len(), accepted, "every message exactly once");
    assert!(
        seen_client.contains("([127.0.0.2])"),
        "the real client address, not the balancer's: {seen_client}"
    );

    // The readers: IMAP through the balancer from 127.0.0.2 while each gateway is
    // restarted in turn. Every pass over the mailboxes sees every message.
    let expected: usize = accepted;
    let script = format!(
        r#"
import imaplib, socket, time, os
U, STOP, EXPECTED = {USERS}, {stop:?}, {expected}
class FromClientAddress(imaplib.IMAP4):
    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=('127.0.0.2', 0))
stop = STOP + '.imap'
retries, passes, bad = 0, 0, []
def session():
    global retries
    while True:
        try:
            return FromClientAddress('127.0.0.1', {imap_front}, timeout=30)
        except OSError:
            retries += 1
            time.sleep(0.1)
while True:
    m = session()
    try:
        m.login('user0@acme.test', 'wrong')
        bad.append('a wrong password was accepted')
        break
    except imaplib.IMAP4.abort:
        retries += 1  # the connection dropped (a restart): try again
    except imaplib.IMAP4.error:
        break
while passes < 3 or not os.path.exists(stop):
    total = 0
    for u in range(U):
        while True:
            try:
                m = session()
                m.login('user%d@acme.test' % u, 'pw')
                total += int(m.select('INBOX', readonly=True)[1][0])
                m.logout()
                break
            except (OSError, imaplib.IMAP4.abort):
                retries += 1
                time.sleep(0.1)
    if total != EXPECTED:
        bad.append(total)
    passes += 1
print(passes, retries, bad)
"#
    );
    let reader = Command::new("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for (i, port) in imap_ports.into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = gateways[i].terminate(Duration::from_secs(60));
        assert!(
            status.success(),
            "gateway {i} exit: {status}\n{}",
            gateways[i].log()
        );
        gateways[i] = spawn("imap-pop3-gateway", &gateway_env(port));
        wait_for(
            "a restarted gateway listening",
            &[&gateways[i]],
            || async move { listening(port).then_some(()) },
        )
        .await;
    }
    std::fs::write(format!("{stop}.imap"), b"").unwrap();
    let out = tokio::task::spawn_blocking(move || reader.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.trim_end().ends_with("[]"),
        "a reader pass missed messages or a wrong password got in: {said}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gateways
            .iter()
            .map(|g| g.log())
            .collect::<Vec<_>>()
            .join("\n-----\n")
    );
    eprintln!("IMAP passes, retries: {said}");
    // The failed login was counted for the real client, not the balancer.
    let counted = Command::new("redis-cli")
        .args([
            "-u",
            &backend_env("MMTEST_REDIS"),
            "GET",
            &format!("{run}:authfail:ip:127.0.0.2"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&counted.stdout).trim(), "1");
}
