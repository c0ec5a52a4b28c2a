//! A farm of daemons: kilnd over TCP with mutual TLS (clients without a
//! certificate from the farm's CA are refused), and kilnctl routing each
//! build to one of several daemons, the same one for the same project,
//! the next one when it is down.

use std::path::Path;
use std::process::Command;

use kiln_e2e::{Daemon, bin, busybox_context, require_root, tool};

/// A CA and a certificate it signs for `cn` (with `san`, when given).
fn make_cert(dir: &Path, ca: &str, name: &str, san: Option<&str>) {
    let p = |n: &str| dir.join(n).display().to_string();
    if !dir.join(format!("{ca}.pem")).exists() {
        tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &p(&format!("{ca}.key")),
                "-out",
                &p(&format!("{ca}.pem")),
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
            ],
        );
    }
    tool(
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &p(&format!("{name}.key")),
            "-out",
            &p(&format!("{name}.csr")),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        match san {
            Some(s) => format!("subjectAltName={s}\n"),
            None => "extendedKeyUsage=clientAuth\n".into(),
        },
    )
    .unwrap();
    tool(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &p(&format!("{name}.csr")),
            "-CA",
            &p(&format!("{ca}.pem")),
            "-CAkey",
            &p(&format!("{ca}.key")),
            "-CAcreateserial",
            "-out",
            &p(&format!("{name}.pem")),
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
        ],
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn tcp_with_mutual_tls_refuses_clients_without_a_certificate() {
    require_root!();
    let certs = tempfile::tempdir().unwrap();
    let c = |n: &str| certs.path().join(n).display().to_string();
    make_cert(certs.path(), "farm-ca", "kilnd", Some("IP:127.0.0.1"));
    make_cert(certs.path(), "farm-ca", "client", None);
    make_cert(certs.path(), "rogue-ca", "rogue", None);
    let tcp = format!("tcp://127.0.0.1:{}", free_port());
    // A TCP listener without certificates is refused at start.
    let o = Command::new(bin("kilnd"))
        .args([
            "--root",
            certs.path().join("state").to_str().unwrap(),
            "--addr",
            &tcp,
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("needs --tlscert, --tlskey and --tlscacert"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let d = Daemon::start_with(&[
        "--addr",
        &tcp,
        "--tlscert",
        &c("kilnd.pem"),
        "--tlskey",
        &c("kilnd.key"),
        "--tlscacert",
        &c("farm-ca.pem"),
    ]);
    let ctx = busybox_context("FROM busybox\nRUN echo over-tls > /hello\n", &[]);
    let out = tempfile::tempdir().unwrap();
    let kilnctl = |extra: &[&str]| {
        Command::new(bin("kilnctl"))
            .args(["--addr", &tcp, "--tlscacert", &c("farm-ca.pem")])
            .args(extra)
            .args([
                "build",
                ctx.path().to_str().unwrap(),
                "--progress",
                "plain",
                "-o",
            ])
            .arg(out.path())
            .output()
            .unwrap()
    };
    // With the farm's client certificate: a real build over TCP.
    let o = kilnctl(&["--tlscert", &c("client.pem"), "--tlskey", &c("client.key")]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        d.log()
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("hello")).unwrap(),
        "over-tls\n"
    );
    // kilnctl will not try without a certificate.
    let o = kilnctl(&[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("give --tlscacert, --tlscert and --tlskey"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The daemon refuses a client with no certificate (curl, speaking HTTP/2
    // over TLS as gRPC does)...
    let port = tcp.rsplit(':').next().unwrap();
    let curl = |extra: &[&str]| {
        Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "--http2",
                "--cacert",
                &c("farm-ca.pem"),
            ])
            .args(extra)
            .arg(format!(
                "https://127.0.0.1:{port}/kiln.control.v1.Control/Info"
            ))
            .output()
            .unwrap()
    };
    // (With the farm's certificate curl gets an HTTP answer: the check below
    // fails for the missing certificate, not for curl.)
    let ok = curl(&["--cert", &c("client.pem"), "--key", &c("client.key")]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let o = curl(&[]);
    // (The handshake or the first read fails, depending on when the
    // daemon's refusal arrives; either way nothing is answered.)
    assert!(!o.status.success(), "a client without a certificate got in");
    // ...and one whose certificate another CA signed.
    let o = kilnctl(&["--tlscert", &c("rogue.pem"), "--tlskey", &c("rogue.key")]);
    assert!(!o.status.success(), "a rogue certificate got in");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the daemon refused this client"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A client that does not trust the daemon's CA refuses it too.
    make_cert(certs.path(), "other-ca", "unused", None);
    let o = Command::new(bin("kilnctl"))
        .args(["--addr", &tcp, "--tlscacert", &c("other-ca.pem")])
        .args([
            "--tlscert",
            &c("client.pem"),
            "--tlskey",
            &c("client.key"),
            "du",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

fn records(d: &Daemon) -> usize {
    let du: serde_json::Value =
        serde_json::from_slice(&d.ok(&["du", "--format", "json"]).stdout).unwrap();
    du["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == "regular")
        .count()
}

#[test]
fn builds_route_to_the_same_daemon_and_fail_over() {
    require_root!();
    let mut daemons = [Daemon::start(), Daemon::start()];
    let farm = format!("{},{}", daemons[0].addr, daemons[1].addr);
    let ctx = busybox_context("FROM busybox\nRUN echo routed > /r\n", &[]);
    let build = || {
        Command::new(bin("kilnctl"))
            .args([
                "--addr",
                &farm,
                "build",
                ctx.path().to_str().unwrap(),
                "--progress",
                "rawjson",
            ])
            .output()
            .unwrap()
    };
    let o = build();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let counts = [records(&daemons[0]), records(&daemons[1])];
    assert!(
        (counts[0] == 0) != (counts[1] == 0),
        "one daemon built it: {counts:?}"
    );
    let chosen = if counts[0] > 0 { 0 } else { 1 };
    // The same project goes to the same daemon, whose cache is warm.
    let o = build();
    assert!(kiln_e2e::all_steps_cached(&o.stdout));
    assert_eq!([records(&daemons[0]), records(&daemons[1])], counts);
    // Its daemon goes away: the build moves to the other one.
    assert!(daemons[chosen].stop());
    let o = build();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unreachable"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(records(&daemons[1 - chosen]) > 0);
}
