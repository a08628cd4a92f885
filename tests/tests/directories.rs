//! Directories as capabilities: host directories granted to guests, seen
//! by WASI programs as preopens and by Cap'n Proto clients as `Directory`.
//!
//! The WASI side runs `files`, a plain std::fs program built both as a
//! component (preview 2) and as a core module (preview 1).

use std::os::unix::fs::symlink;
use std::path::Path;

use capsa::schema::{directory, executor, process, EntryKind, StdioMode, WriteMode};
use capsa::{DirGrant, ExitStatus, HostConfig};
use capsa_tests::{
    assert_kind, exported_executor, granted, guest, healthy, read_all, read_once, run,
    still_healthy, wait, with_host, ErrorKind, Run, TempDir,
};

/// The two builds of the same program.
const BUILDS: [&str; 2] = ["files", "files-p1"];

struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `build` of `files` in data mode with `args`, `stdin` and `dirs`.
async fn files(
    exec: &executor::Client,
    build: &str,
    args: &[&str],
    stdin: &[u8],
    dirs: &[(&str, &directory::Client)],
) -> Output {
    let p = run(
        exec,
        &guest(build),
        Run {
            args,
            stdio: StdioMode::Data,
            name: "files",
            dirs,
            ..Run::default()
        },
    )
    .await
    .unwrap();
    feed(&p, stdin).await;
    let stdout = read_all(p.stdout_request().send().pipeline.get_source()).await;
    let stderr = read_all(p.stderr_request().send().pipeline.get_source()).await;
    Output {
        status: wait(&p).await,
        stdout: String::from_utf8(stdout).unwrap(),
        stderr: String::from_utf8(stderr).unwrap(),
    }
}

async fn feed(p: &process::Client, bytes: &[u8]) {
    let sink = capsa_client::stdin(p).await.unwrap();
    capsa_client::write_all(&sink, bytes).await.unwrap();
}

/// `files` that must exit with `code`.
async fn exits(
    exec: &executor::Client,
    build: &str,
    args: &[&str],
    dirs: &[(&str, &directory::Client)],
    code: i32,
) -> Output {
    let out = files(exec, build, args, b"", dirs).await;
    let said = format!("{args:?}: {}{}", out.stdout, out.stderr);
    assert_eq!(out.status, ExitStatus::Exited(code), "{said}");
    out
}

/// `files` that must succeed; its stdout.
async fn ok(
    exec: &executor::Client,
    build: &str,
    args: &[&str],
    dirs: &[(&str, &directory::Client)],
) -> String {
    exits(exec, build, args, dirs, 0).await.stdout
}

/// `files` that must fail; its stderr.
async fn fails(
    exec: &executor::Client,
    build: &str,
    args: &[&str],
    dirs: &[(&str, &directory::Client)],
) -> String {
    exits(exec, build, args, dirs, 1).await.stderr
}

/// A host with `dir` granted read-write at "/data" to every root Executor.
fn granting(dir: &Path) -> HostConfig {
    HostConfig {
        directories: vec![DirGrant {
            path: "/data".into(),
            host_path: dir.to_path_buf(),
            read_only: false,
        }],
        ..HostConfig::default()
    }
}

async fn the_grant(exec: &executor::Client) -> directory::Client {
    let mut grants = granted(exec).await;
    assert_eq!(grants.len(), 1);
    let (path, dir) = grants.pop().unwrap();
    assert_eq!(path, "/data");
    dir
}

#[test]
fn wasi_programs_work_on_files_in_a_granted_directory() {
    let tmp = TempDir::new("dirs-wasi");
    with_host(granting(tmp.path()), |host| async move {
        let exec = host.root_executor();
        let data = the_grant(&exec).await;
        for build in BUILDS {
            let dirs = [("/data", &data)];
            let sub = format!("/data/{build}");
            let (log, txt, moved) = (
                format!("{sub}/log"),
                format!("{sub}.txt"),
                format!("{sub}/moved"),
            );
            let put = files(&exec, build, &["put", &txt], b"written by a child\n", &dirs).await;
            assert_eq!(put.status, ExitStatus::Exited(0), "{}", put.stderr);
            // On the host, at once.
            assert_eq!(
                std::fs::read_to_string(tmp.path().join(format!("{build}.txt"))).unwrap(),
                "written by a child\n"
            );
            for args in [
                &["mkdir", sub.as_str()][..],
                &["append", &log, "one"],
                &["append", &log, "two"],
                &["mv", &txt, &moved],
            ] {
                ok(&exec, build, args, &dirs).await;
            }
            assert_eq!(ok(&exec, build, &["cat", &log], &dirs).await, "one\ntwo\n");
            assert_eq!(
                ok(&exec, build, &["ls", &sub], &dirs).await,
                "log file 8\nmoved file 19\n"
            );
            assert_eq!(
                ok(&exec, build, &["stat", &moved], &dirs).await,
                "file 19\n"
            );
            ok(&exec, build, &["rm", &log], &dirs).await;
            assert!(!tmp.path().join(build).join("log").exists());
            // A file written on the host is there for the child.
            std::fs::write(tmp.path().join("from-host"), "hello child").unwrap();
            assert_eq!(
                ok(&exec, build, &["cat", "/data/from-host"], &dirs).await,
                "hello child"
            );
            // Errors are the program's own, as on any filesystem.
            let err = fails(&exec, build, &["cat", "/data/missing"], &dirs).await;
            assert!(err.starts_with("error: NotFound"), "{build}: {err}");
            let err = fails(&exec, build, &["rm", &sub], &dirs).await;
            assert!(err.contains("Directory not empty"), "{build}: {err}");
        }
    });
}

/// A grant passes through a guest: the parent hands the Directory to a
/// child (over the child's own connection), the child grants it to a
/// grandchild, and the host still recognises it as its own.
#[test]
fn a_directory_passes_through_a_child_to_a_grandchild() {
    let tmp = TempDir::new("dirs-nested");
    with_host(granting(tmp.path()), |host| async move {
        let exec = host.root_executor();
        let data = the_grant(&exec).await;
        let child = run(&exec, &guest("child-echo"), Run::default())
            .await
            .unwrap();
        // child-echo's exported Executor forwards runBytes to its own.
        let through_child = exported_executor(&child);
        let ro = sub(&data, "", true).await.unwrap();
        for build in BUILDS {
            let path = format!("/data/{build}-grandchild");
            let out = files(
                &through_child,
                build,
                &["put", &path],
                b"from a grandchild",
                &[("/data", &data)],
            )
            .await;
            assert_eq!(out.status, ExitStatus::Exited(0), "{}", out.stderr);
            let on_host = tmp.path().join(format!("{build}-grandchild"));
            assert_eq!(
                std::fs::read_to_string(on_host).unwrap(),
                "from a grandchild"
            );
            // Attenuation holds at every level.
            let out = files(
                &through_child,
                build,
                &["put", "/ro/x"],
                b"",
                &[("/ro", &ro)],
            )
            .await;
            assert_eq!(out.status, ExitStatus::Exited(1), "{build}");
        }
        assert!(!tmp.path().join("x").exists());
        // A child's own Executor lists what its parent granted it.
        let granted_child = run(
            &exec,
            &guest("child-echo"),
            Run {
                dirs: &[("/ro", &ro), ("/data", &data)],
                ..Run::default()
            },
        )
        .await
        .unwrap();
        let listed = granted(&exported_executor(&granted_child)).await;
        let paths: Vec<&str> = listed.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["/ro", "/data"]);
        assert!(granted(&through_child).await.is_empty());
    });
}

#[test]
fn without_a_grant_a_child_sees_no_files() {
    let tmp = TempDir::new("dirs-none");
    std::fs::write(tmp.path().join("secret"), "no").unwrap();
    with_host(granting(tmp.path()), |host| async move {
        let exec = host.root_executor();
        let secret = tmp.path().join("secret");
        let secret = secret.to_str().unwrap();
        for build in BUILDS {
            // The host grants "/data" to its root Executor's holder; a
            // child gets nothing unless its parent passes it on.
            let err = fails(&exec, build, &["cat", "/data/secret"], &[]).await;
            assert!(err.starts_with("error:"), "{build}: {err}");
            let err = fails(&exec, build, &["cat", secret], &[]).await;
            assert!(err.starts_with("error:"), "{build}: {err}");
            let err = fails(&exec, build, &["ls", "/"], &[]).await;
            assert!(err.starts_with("error:"), "{build}: {err}");
        }
    });
}

#[test]
fn a_child_cannot_leave_its_directory() {
    let outer = TempDir::new("dirs-escape");
    let granted_dir = outer.path().join("granted");
    std::fs::create_dir(&granted_dir).unwrap();
    std::fs::write(outer.path().join("outside"), "secret").unwrap();
    symlink(outer.path().join("outside"), granted_dir.join("abs-link")).unwrap();
    symlink("../outside", granted_dir.join("rel-link")).unwrap();
    std::fs::write(granted_dir.join("inside"), "fine").unwrap();
    symlink("inside", granted_dir.join("good-link")).unwrap();
    with_host(granting(&granted_dir), |host| async move {
        let exec = host.root_executor();
        let data = the_grant(&exec).await;
        let dirs = [("/data", &data)];
        for build in BUILDS {
            for path in [
                "/data/../outside",
                "/data/abs-link",
                "/data/rel-link",
                "/data/./../granted/../outside",
            ] {
                let out = files(&exec, build, &["cat", path], b"", &dirs).await;
                assert_eq!(out.status, ExitStatus::Exited(1), "{build} {path}");
                assert!(!out.stdout.contains("secret"), "{build} {path}");
            }
            assert_eq!(
                ok(&exec, build, &["cat", "/data/good-link"], &dirs).await,
                "fine"
            );
        }
        // The same through the capability: refused before any system call.
        for path in ["../outside", "/etc/passwd", "a\0b", "x/../../outside"] {
            let err = read(&data, path).await.err().unwrap();
            assert_kind(&err, ErrorKind::BadPath, "");
        }
        for path in ["abs-link", "rel-link"] {
            let err = read(&data, path).await.err().unwrap();
            assert_kind(&err, ErrorKind::BadPath, "leads outside");
        }
        assert_eq!(read(&data, "good-link").await.unwrap(), b"fine");
    });
}

#[test]
fn a_read_only_view_stays_read_only() {
    let tmp = TempDir::new("dirs-ro");
    std::fs::write(tmp.path().join("keep"), "original").unwrap();
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    with_host(granting(tmp.path()), |host| async move {
        let exec = host.root_executor();
        let data = the_grant(&exec).await;
        let ro = sub(&data, "", true).await.unwrap();
        let dirs = [("/ro", &ro)];
        for build in BUILDS {
            let out = files(&exec, build, &["put", "/ro/keep"], b"changed", &dirs).await;
            assert_eq!(out.status, ExitStatus::Exited(1), "{build}");
            fails(&exec, build, &["mkdir", "/ro/new"], &dirs).await;
            fails(&exec, build, &["rm", "/ro/keep"], &dirs).await;
            fails(&exec, build, &["mv", "/ro/keep", "/ro/moved"], &dirs).await;
            assert_eq!(
                ok(&exec, build, &["cat", "/ro/keep"], &dirs).await,
                "original"
            );
        }
        // Through the capability, and through every view taken from it,
        // even one that asks for read-write.
        let rw_again = sub(&ro, "sub", false).await.unwrap();
        for dir in [&ro, &rw_again] {
            assert_kind(
                &write(dir, "keep", WriteMode::Truncate, b"x")
                    .await
                    .err()
                    .unwrap(),
                ErrorKind::ReadOnly,
                "read-only",
            );
            assert_kind(
                &call_mkdir(dir, "new").await.err().unwrap(),
                ErrorKind::ReadOnly,
                "",
            );
            assert_kind(
                &remove(dir, "keep").await.err().unwrap(),
                ErrorKind::ReadOnly,
                "",
            );
            assert_kind(
                &rename(dir, "keep", "k2").await.err().unwrap(),
                ErrorKind::ReadOnly,
                "",
            );
        }
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("keep")).unwrap(),
            "original"
        );
        assert!(!tmp.path().join("new").exists());
    });
}

#[test]
fn the_directory_capability_does_what_the_schema_says() {
    let tmp = TempDir::new("dirs-cap");
    with_host(granting(tmp.path()), |host| async move {
        let exec = host.root_executor();
        let data = the_grant(&exec).await;
        // write: truncate, append, createNew.
        write(&data, "a.txt", WriteMode::Truncate, b"hello")
            .await
            .unwrap();
        write(&data, "a.txt", WriteMode::Append, b", world")
            .await
            .unwrap();
        assert_eq!(read(&data, "a.txt").await.unwrap(), b"hello, world");
        write(&data, "a.txt", WriteMode::Truncate, b"bye")
            .await
            .unwrap();
        assert_eq!(std::fs::read(tmp.path().join("a.txt")).unwrap(), b"bye");
        let err = write(&data, "a.txt", WriteMode::CreateNew, b"x")
            .await
            .err()
            .unwrap();
        assert_kind(&err, ErrorKind::Exists, "a.txt");
        // mkdir, stat, list.
        call_mkdir(&data, "d").await.unwrap();
        assert_kind(
            &call_mkdir(&data, "d").await.err().unwrap(),
            ErrorKind::Exists,
            "",
        );
        assert_kind(
            &call_mkdir(&data, "no/such").await.err().unwrap(),
            ErrorKind::NotFound,
            "",
        );
        write(&data, "d/inner", WriteMode::CreateNew, &[7; 3000])
            .await
            .unwrap();
        let info = stat(&data, "d/inner").await.unwrap();
        assert_eq!(info, (EntryKind::File, 3000));
        // read: the end comes with the last bytes, not one call later.
        let mut req = data.read_request();
        req.get().set_path("d/inner");
        let source = req.send().pipeline.get_source();
        assert_eq!(read_once(&source, 2000).await, (vec![7; 2000], false));
        assert_eq!(read_once(&source, 2000).await, (vec![7; 1000], true));
        assert_eq!(read_once(&source, 2000).await, (Vec::new(), true));
        assert_eq!(stat(&data, "d").await.unwrap().0, EntryKind::Directory);
        assert_eq!(stat(&data, "").await.unwrap().0, EntryKind::Directory);
        assert_kind(
            &stat(&data, "nothing").await.err().unwrap(),
            ErrorKind::NotFound,
            "nothing",
        );
        let mut names = list(&data, "").await.unwrap();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            names,
            [
                ("a.txt".to_string(), EntryKind::File, 3),
                ("d".to_string(), EntryKind::Directory, 0)
            ]
        );
        assert_kind(
            &list(&data, "a.txt").await.err().unwrap(),
            ErrorKind::NotADirectory,
            "",
        );
        assert_kind(
            &read(&data, "d").await.err().unwrap(),
            ErrorKind::IsADirectory,
            "",
        );
        assert_kind(
            &read(&data, "").await.err().unwrap(),
            ErrorKind::BadPath,
            "itself",
        );
        // remove: a file, a non-empty directory, an empty one.
        assert_kind(
            &remove(&data, "d").await.err().unwrap(),
            ErrorKind::NotEmpty,
            "",
        );
        remove(&data, "d/inner").await.unwrap();
        remove(&data, "d").await.unwrap();
        assert_kind(
            &remove(&data, "d").await.err().unwrap(),
            ErrorKind::NotFound,
            "",
        );
        // rename, and a sub view that sees only its part.
        call_mkdir(&data, "s").await.unwrap();
        rename(&data, "a.txt", "s/b.txt").await.unwrap();
        let s = sub(&data, "s", false).await.unwrap();
        assert_eq!(read(&s, "b.txt").await.unwrap(), b"bye");
        assert_kind(
            &read(&s, "../s/b.txt").await.err().unwrap(),
            ErrorKind::BadPath,
            "",
        );
        assert_kind(
            &sub(&data, "s/b.txt", false).await.err().unwrap(),
            ErrorKind::NotADirectory,
            "",
        );
        // A sub view granted onwards is a preopen of that part only.
        let out = ok(&exec, "files", &["ls", "/s"], &[("/s", &s)]).await;
        assert_eq!(out, "b.txt file 3\n");
    });
}

#[test]
fn a_directory_removed_on_the_host_fails_cleanly() {
    let tmp = TempDir::new("dirs-removed");
    let doomed = tmp.path().join("doomed");
    std::fs::create_dir(&doomed).unwrap();
    with_host(granting(&doomed), |host| async move {
        let exec = host.root_executor();
        let witness = healthy(&exec).await;
        let data = the_grant(&exec).await;
        write(&data, "f", WriteMode::Truncate, b"x").await.unwrap();
        std::fs::remove_dir_all(&doomed).unwrap();
        assert_kind(
            &read(&data, "f").await.err().unwrap(),
            ErrorKind::NotFound,
            "",
        );
        assert!(write(&data, "g", WriteMode::Truncate, b"x").await.is_err());
        assert_eq!(list(&data, "").await.unwrap(), []);
        for build in BUILDS {
            let err = fails(&exec, build, &["put", "/data/g"], &[("/data", &data)]).await;
            assert!(err.starts_with("error: NotFound"), "{build}: {err}");
        }
        still_healthy(&witness).await;
    });
}

#[test]
fn open_files_are_bounded_per_guest_and_per_grant() {
    let tmp = TempDir::new("dirs-open");
    // Descriptors of files in the granted folder: the ones this test makes
    // the host open. Counting the whole process's would count those of the
    // other tests of this file running meanwhile.
    let root = tmp.path().display().to_string();
    let ours = move || {
        capsa_tests::open_fds()
            .iter()
            .filter(|p| p.starts_with(&root))
            .count()
    };
    with_host(granting(tmp.path()), |host| async move {
        let exec = host.root_executor();
        let witness = healthy(&exec).await;
        let data = the_grant(&exec).await;
        let fds_before = ours();
        for build in BUILDS {
            let out = files(
                &exec,
                build,
                &["hold", "/data", "10000"],
                b"",
                &[("/data", &data)],
            )
            .await;
            // The guest is stopped at its handle bound, with a status
            // that says so; the host's descriptors are given back.
            match &out.status {
                ExitStatus::Trapped(why) => {
                    assert!(why.contains("resource table"), "{build}: {why}")
                }
                other => panic!("{build}: {other:?} {}", out.stdout),
            }
            still_healthy(&witness).await;
        }
        // Through the capability: MAX_OPEN_FILES sinks, then `quota`.
        let mut sinks = Vec::new();
        for i in 0..capsa::directory::MAX_OPEN_FILES {
            sinks.push(open_sink(&data, &format!("s{i}")).await.unwrap());
        }
        let err = open_sink(&data, "one-more").await.err().unwrap();
        assert_kind(&err, ErrorKind::Quota, "files are open");
        drop(sinks);
        // Released files give their places back.
        let mut again = None;
        for _ in 0..100 {
            match open_sink(&data, "one-more").await {
                Ok(s) => {
                    again = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        assert!(again.is_some(), "closed files were not given back");
        drop(again);
        // Closing is asynchronous (blocking threads, released capabilities).
        for _ in 0..1000 {
            if ours() <= fds_before {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            ours() <= fds_before,
            "descriptors were kept: {} of {} files open in the grant",
            ours(),
            fds_before
        );
        still_healthy(&witness).await;
    });
}

#[test]
fn bad_grants_are_refused() {
    let tmp = TempDir::new("dirs-bad");
    with_host(granting(tmp.path()), |host| async move {
        let exec = host.root_executor();
        let data = the_grant(&exec).await;
        for path in ["", "a\0b"] {
            let err = run(
                &exec,
                &guest("files"),
                Run {
                    stdio: StdioMode::Data,
                    dirs: &[(path, &data)],
                    ..Run::default()
                },
            )
            .await
            .err()
            .unwrap();
            assert_kind(&err, ErrorKind::BadRequest, "path");
        }
        // A Directory from elsewhere that implements nothing.
        let broken: directory::Client = capnp_rpc::new_client(NotADir);
        let err = run(
            &exec,
            &guest("files"),
            Run {
                stdio: StdioMode::Data,
                dirs: &[("/x", &broken)],
                ..Run::default()
            },
        )
        .await
        .err()
        .unwrap();
        assert!(err.contains("not implemented"), "{err}");
    });
    // A grant of a path that is not a directory stops the host from starting.
    let file = tmp.path().join("file");
    std::fs::write(&file, "").unwrap();
    for host_path in [file, tmp.path().join("missing")] {
        let config = HostConfig {
            directories: vec![DirGrant {
                path: "/d".into(),
                host_path,
                read_only: false,
            }],
            ..HostConfig::default()
        };
        let err = capsa::Host::new(config).err().expect("a bad grant");
        assert!(err.to_string().contains("cannot grant"), "{err}");
    }
}

/// A Directory implemented outside the host.
struct NotADir;
impl directory::Server for NotADir {}

/// A Directory that never answers a `list`.
struct Silent;
impl directory::Server for Silent {
    async fn list(
        self: std::rc::Rc<Self>,
        _: directory::ListParams,
        _: directory::ListResults,
    ) -> Result<(), capnp::Error> {
        std::future::pending().await
    }
}

/// A Directory of another host (another `capsa serve`, another process)
/// granted to a child: copied in before it starts, written back when it
/// ends, before its exit status is given.
#[test]
fn a_directory_from_elsewhere_is_copied_in_and_written_back() {
    let here = TempDir::new("dirs-here");
    let there = TempDir::new("dirs-there");
    std::fs::write(there.path().join("in.txt"), "from the other host").unwrap();
    std::fs::write(there.path().join("old"), "remove me").unwrap();
    std::fs::create_dir(there.path().join("keep")).unwrap();
    std::fs::write(there.path().join("keep/k"), "kept").unwrap();
    let other = granting(there.path());
    let scratch_dir = TempDir::new("dirs-scratch");
    let scratch = scratch_dir.path().to_path_buf();
    let config = HostConfig {
        scratch_dir: Some(scratch.clone()),
        ..granting(here.path())
    };
    with_host(config, |host| async move {
        let exec = host.root_executor();
        let other_host = capsa::Host::new(other).unwrap();
        let remote = the_grant(&other_host.root_executor()).await;
        let dirs = [("/data", &remote)];
        for build in BUILDS {
            assert_eq!(
                ok(&exec, build, &["cat", "/data/in.txt"], &dirs).await,
                "from the other host"
            );
            assert_eq!(
                ok(&exec, build, &["cat", "/data/keep/k"], &dirs).await,
                "kept"
            );
            let out = files(
                &exec,
                build,
                &["put", &format!("/data/{build}.txt")],
                b"back",
                &dirs,
            )
            .await;
            assert_eq!(out.status, ExitStatus::Exited(0), "{}", out.stderr);
            // Written back before the exit status was given.
            let back = there.path().join(format!("{build}.txt"));
            assert_eq!(std::fs::read_to_string(back).unwrap(), "back");
            ok(
                &exec,
                build,
                &["mkdir", &format!("/data/{build}-dir")],
                &dirs,
            )
            .await;
            assert!(there.path().join(format!("{build}-dir")).is_dir());
        }
        ok(&exec, "files", &["rm", "/data/old"], &dirs).await;
        assert!(!there.path().join("old").exists());
        assert_eq!(
            std::fs::read_to_string(there.path().join("keep/k")).unwrap(),
            "kept"
        );
        // Nothing of this host's changed, and no copy is left behind.
        assert_eq!(std::fs::read_dir(here.path()).unwrap().count(), 0);
        let left = std::fs::read_dir(&scratch).unwrap().count();
        assert_eq!(left, 0, "copies left in the scratch folder");
        // A read-only Directory from elsewhere refuses the write-back: the
        // child's change stays in its copy.
        let ro = sub(&remote, "", true).await.unwrap();
        ok(&exec, "files", &["put", "/ro/in.txt"], &[("/ro", &ro)]).await;
        assert_eq!(
            std::fs::read_to_string(there.path().join("in.txt")).unwrap(),
            "from the other host"
        );
        other_host.shutdown().await;
    });
}

#[test]
fn a_directory_from_elsewhere_is_bounded_in_size_and_time() {
    let there = TempDir::new("dirs-big");
    // Sparse: its size counts, not its blocks.
    let big = std::fs::File::create(there.path().join("big")).unwrap();
    big.set_len(capsa::mirror::MAX_BYTES + 1).unwrap();
    let other = granting(there.path());
    let config = HostConfig {
        directory_timeout: std::time::Duration::from_millis(300),
        ..HostConfig::default()
    };
    with_host(config, |host| async move {
        let exec = host.root_executor();
        let witness = healthy(&exec).await;
        let other_host = capsa::Host::new(other).unwrap();
        let remote = the_grant(&other_host.root_executor()).await;
        let start = |dir: directory::Client| {
            let exec = exec.clone();
            async move {
                run(
                    &exec,
                    &guest("files"),
                    Run {
                        stdio: StdioMode::Data,
                        dirs: &[("/d", &dir)],
                        ..Run::default()
                    },
                )
                .await
                .err()
                .unwrap()
            }
        };
        assert_kind(&start(remote).await, ErrorKind::TooLarge, "MiB");
        let silent: directory::Client = capnp_rpc::new_client(Silent);
        assert_kind(&start(silent).await, ErrorKind::Failed, "did not answer");
        still_healthy(&witness).await;
        other_host.shutdown().await;
    });
}

async fn read(dir: &directory::Client, path: &str) -> Result<Vec<u8>, String> {
    let mut req = dir.read_request();
    req.get().set_path(path);
    let response = req.send().promise.await.map_err(|e| e.to_string())?;
    let source = response.get().unwrap().get_source().unwrap();
    Ok(read_all(source).await)
}

async fn open_sink(
    dir: &directory::Client,
    path: &str,
) -> Result<capsa::schema::byte_sink::Client, String> {
    let mut req = dir.write_request();
    req.get().set_path(path);
    req.get().set_mode(WriteMode::Truncate);
    let response = req.send().promise.await.map_err(|e| e.to_string())?;
    Ok(response.get().unwrap().get_sink().unwrap())
}

async fn write(
    dir: &directory::Client,
    path: &str,
    mode: WriteMode,
    bytes: &[u8],
) -> Result<(), String> {
    let mut req = dir.write_request();
    req.get().set_path(path);
    req.get().set_mode(mode);
    let response = req.send().promise.await.map_err(|e| e.to_string())?;
    let sink = response.get().unwrap().get_sink().unwrap();
    let mut w = sink.write_request();
    w.get().set_data(bytes);
    w.send().await.map_err(|e| e.to_string())?;
    sink.close_request()
        .send()
        .promise
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

async fn call_mkdir(dir: &directory::Client, path: &str) -> Result<(), String> {
    let mut req = dir.mkdir_request();
    req.get().set_path(path);
    req.send()
        .promise
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn remove(dir: &directory::Client, path: &str) -> Result<(), String> {
    let mut req = dir.remove_request();
    req.get().set_path(path);
    req.send()
        .promise
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn rename(dir: &directory::Client, from: &str, to: &str) -> Result<(), String> {
    let mut req = dir.rename_request();
    req.get().set_from(from);
    req.get().set_to(to);
    req.send()
        .promise
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn sub(
    dir: &directory::Client,
    path: &str,
    read_only: bool,
) -> Result<directory::Client, String> {
    let mut req = dir.sub_request();
    req.get().set_path(path);
    req.get().set_read_only(read_only);
    let response = req.send().promise.await.map_err(|e| e.to_string())?;
    Ok(response.get().unwrap().get_directory().unwrap())
}

async fn stat(dir: &directory::Client, path: &str) -> Result<(EntryKind, u64), String> {
    let mut req = dir.stat_request();
    req.get().set_path(path);
    let response = req.send().promise.await.map_err(|e| e.to_string())?;
    let info = response.get().unwrap().get_info().unwrap();
    Ok((info.get_kind().unwrap(), info.get_size()))
}

async fn list(
    dir: &directory::Client,
    path: &str,
) -> Result<Vec<(String, EntryKind, u64)>, String> {
    let mut req = dir.list_request();
    req.get().set_path(path);
    let response = req.send().promise.await.map_err(|e| e.to_string())?;
    let entries = response.get().unwrap().get_entries().unwrap();
    Ok(entries
        .iter()
        .map(|e| {
            let info = e.get_info().unwrap();
            let size = match info.get_kind().unwrap() {
                EntryKind::File => info.get_size(),
                _ => 0,
            };
            (
                e.get_name().unwrap().to_string().unwrap(),
                info.get_kind().unwrap(),
                size,
            )
        })
        .collect())
}

/// What bounds a guest's writes to a grant is the granted directory's own
/// filesystem: a guest filling it gets "no space" as any program would,
/// the host goes on, and the capability says `noSpace`. The test grants a
/// 4 MiB tmpfs, mounted in a mount namespace of its own: it runs itself
/// again under `unshare` (root in a new user namespace where the kernel
/// allows it, or root), and that run does the work.
#[test]
fn a_guest_filling_its_grants_filesystem_gets_no_space_and_the_host_goes_on() {
    const INNER: &str = "CAPSA_TEST_SMALL_FS";
    if let Some(mount_point) = std::env::var_os(INNER) {
        return filling_a_small_filesystem(Path::new(&mount_point));
    }
    let tmp = TempDir::new("dirs-small-fs");
    let out = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_guest_filling_its_grants_filesystem_gets_no_space_and_the_host_goes_on",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER, tmp.path())
        .output()
        .expect("`unshare` (util-linux) runs this test in a mount namespace of its own");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    // The inner run did run the test (and not an empty filter).
    assert!(said.contains("1 passed"), "{said}");
}

fn filling_a_small_filesystem(mount_point: &Path) {
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "capsa-test"])
        .arg(mount_point)
        .status()
        .expect("mount");
    assert!(
        mounted.success(),
        "cannot mount a tmpfs in the test's namespace"
    );
    with_host(granting(mount_point), |host| async move {
        let exec = host.root_executor();
        let data = the_grant(&exec).await;
        for build in BUILDS {
            let err = fails(
                &exec,
                build,
                &["fill", "/data/big", "16"],
                &[("/data", &data)],
            )
            .await;
            // Preview 1 says ENOSPC; a preview-2 program's write goes
            // through a `wasi:io` stream, whose failure reaches it as EIO.
            assert!(
                err.contains("No space left on device") || err.contains("I/O error"),
                "{build}: {err}"
            );
            ok(&exec, build, &["rm", "/data/big"], &[("/data", &data)]).await;
            ok(&exec, build, &["put", "/data/small"], &[("/data", &data)]).await;
        }
        // Through the capability: the sink's write or its close says so.
        let sink = capsa_client::create(&data, "big", WriteMode::Truncate)
            .await
            .unwrap();
        let chunk = vec![7u8; 1 << 20];
        let mut failed = None;
        for _ in 0..16 {
            let mut w = sink.write_request();
            w.get().set_data(&chunk);
            if let Err(e) = w.send().await {
                failed = Some(e);
                break;
            }
        }
        let failed = match failed {
            Some(e) => e,
            None => sink
                .close_request()
                .send()
                .promise
                .await
                .map(drop)
                .unwrap_err(),
        };
        assert_eq!(
            capsa_schema::error::kind(&failed),
            ErrorKind::NoSpace,
            "{failed}"
        );
        healthy(&exec).await;
    });
}
