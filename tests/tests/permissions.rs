//! Other users on the mount: the kernel's permission rules hold (the source is mounted by
//! root but must not let every user do what root can), created files belong to their creator,
//! and the image ends up with the same owners.

use nvmirror_e2e::{
    assert_trees_equal_named, require_mount, run_as, show_output, Harness, HarnessOptions,
};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

const USER: u32 = 65534; // nobody
const OTHER_USER: u32 = 65533;

#[test]
fn permissions_for_other_users() {
    const TEST: &str = "permissions_for_other_users";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let m = h.mnt();

    // A root-owned 0755 directory and a world-writable sticky one, made by root.
    fs::create_dir(m.join("locked")).expect("mkdir locked");
    fs::set_permissions(m.join("locked"), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::create_dir(m.join("shared")).expect("mkdir shared");
    fs::set_permissions(m.join("shared"), fs::Permissions::from_mode(0o1777)).expect("chmod");
    fs::write(m.join("locked/root-file"), b"root's\n").expect("write root-file");
    fs::set_permissions(
        m.join("locked/root-file"),
        fs::Permissions::from_mode(0o644),
    )
    .expect("chmod root-file");

    // The other user can see the mount at all (allow_other).
    let out = run_as(USER, "ls locked", m);
    assert!(
        out.status.success(),
        "uid {USER} cannot list the mount (allow_other missing?): {}",
        show_output("ls locked", &out)
    );

    // Creating in a root-owned 0755 directory: EACCES.
    let out = run_as(USER, "echo x > locked/intruder", m);
    assert!(
        !out.status.success(),
        "uid {USER} created a file in a root-owned 0755 dir: {}",
        show_output("create in locked", &out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "expected EACCES: {}",
        show_output("create in locked", &out)
    );
    assert!(!m.join("locked/intruder").exists());
    assert!(!h.backing().join("locked/intruder").exists());

    // Writing root's 0644 file: EACCES.
    let out = run_as(USER, "echo x >> locked/root-file", m);
    assert!(
        !out.status.success(),
        "uid {USER} wrote root's 0644 file: {}",
        show_output("append root-file", &out)
    );
    assert_eq!(
        fs::read(m.join("locked/root-file")).unwrap(),
        b"root's\n",
        "root-file changed"
    );

    // Creating in the sticky 1777 directory: allowed, and the file is the creator's.
    let out = run_as(USER, "echo mine > shared/mine && mkdir shared/mydir", m);
    assert!(
        out.status.success(),
        "{}",
        show_output("create in shared", &out)
    );
    for path in [m.join("shared/mine"), h.backing().join("shared/mine")] {
        let meta = fs::metadata(&path).expect("stat shared/mine");
        assert_eq!(
            (meta.uid(), meta.gid()),
            (USER, USER),
            "{} must belong to its creator",
            path.display()
        );
    }

    // Another user cannot remove or rename it (sticky), nor write it (0644 by umask).
    let out = run_as(OTHER_USER, "rm -f shared/mine", m);
    assert!(
        !out.status.success(),
        "uid {OTHER_USER} removed uid {USER}'s file from a sticky dir: {}",
        show_output("rm shared/mine", &out)
    );
    let out = run_as(OTHER_USER, "mv shared/mine shared/stolen", m);
    assert!(
        !out.status.success(),
        "uid {OTHER_USER} renamed uid {USER}'s file in a sticky dir: {}",
        show_output("mv shared/mine", &out)
    );
    assert_eq!(fs::read(m.join("shared/mine")).unwrap(), b"mine\n");

    // Its owner can chmod it; another user cannot.
    let out = run_as(USER, "chmod 600 shared/mine", m);
    assert!(out.status.success(), "{}", show_output("owner chmod", &out));
    let out = run_as(OTHER_USER, "chmod 666 shared/mine", m);
    assert!(
        !out.status.success(),
        "uid {OTHER_USER} chmod'ed a file it does not own: {}",
        show_output("chmod by other", &out)
    );
    let out = run_as(OTHER_USER, "cat shared/mine", m);
    assert!(
        !out.status.success(),
        "uid {OTHER_USER} read a 0600 file of uid {USER}: {}",
        show_output("cat by other", &out)
    );

    h.cp();
    assert_trees_equal_named(h.backing(), &h.image(), "backing", "image");
    let meta = fs::metadata(h.image().join("shared/mine")).expect("shared/mine in the image");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (USER, USER, 0o600),
        "owner and mode in the image"
    );
}

/// A write drops a file's capabilities (the kernel asks for `security.capability` before
/// every write, and fs-source answers "none" from memory for files it has seen without): a
/// file given capabilities after earlier writes must still lose them at its next write, on
/// the mount and on the backing volume.
#[test]
fn a_write_drops_later_capabilities() {
    const TEST: &str = "a_write_drops_later_capabilities";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let f = h.mnt().join("tool");
    fs::write(&f, b"v1\n").expect("write tool");
    let append = |what: &[u8]| {
        use std::io::Write;
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .expect("open tool");
        file.write_all(what).expect("append to tool");
    };
    append(b"v2\n"); // the kernel has asked about capabilities at least twice now
                     // VFS_CAP_REVISION_2, CAP_NET_BIND_SERVICE permitted.
    let mut caps = Vec::new();
    for word in [0x0200_0000u32, 1 << 10, 0, 0, 0] {
        caps.extend_from_slice(&word.to_le_bytes());
    }
    rustix::fs::setxattr(
        &f,
        "security.capability",
        &caps,
        rustix::fs::XattrFlags::empty(),
    )
    .expect("set file capabilities through the mount");
    let mut buf = [0u8; 64];
    let n = rustix::fs::getxattr(&f, "security.capability", &mut buf)
        .expect("capabilities readable after setting them");
    assert_eq!(&buf[..n], &caps[..], "capabilities as set");

    append(b"v3\n");
    for (what, path) in [("mount", f.clone()), ("backing", h.backing().join("tool"))] {
        let left = rustix::fs::getxattr(&path, "security.capability", &mut buf);
        assert_eq!(
            left.err(),
            Some(rustix::io::Errno::NODATA),
            "the {what} still has the capabilities after a write"
        );
    }
    assert_eq!(fs::read(&f).expect("read tool"), b"v1\nv2\nv3\n");
    h.cp();
    let left = rustix::fs::getxattr(h.image().join("tool"), "security.capability", &mut buf);
    assert_eq!(
        left.err(),
        Some(rustix::io::Errno::NODATA),
        "the image still has the capabilities after a write"
    );
}

/// Set-ID bits at a content change (the kernel leaves them to fs-source under FUSE
/// `HANDLE_KILLPRIV_V2`): a write or a truncation by a user without CAP_FSETID clears
/// set-user-ID, and set-group-ID when the group may execute, on the mount, the backing volume
/// and the image, set-group-ID also when the writer is not in the file's group (Linux 6.2 and
/// later); root's writes keep them, as does a set-group-ID file the group cannot execute
/// written by a member of its group.
#[test]
fn writes_clear_set_id_bits() {
    const TEST: &str = "writes_clear_set_id_bits";
    require_mount!(TEST);
    let h = Harness::start(HarnessOptions::new(TEST));
    let m = h.mnt();
    let make = |name: &str, mode: u32| {
        fs::write(m.join(name), b"v1\n").unwrap_or_else(|e| panic!("write {name}: {e}"));
        fs::set_permissions(m.join(name), fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {name}: {e}"));
    };
    make("by-user", 0o6777);
    make("by-root", 0o6777);
    make("no-gexec", 0o2666);
    make("member", 0o2666);
    std::os::unix::fs::lchown(m.join("member"), Some(USER), Some(USER)).expect("chown member");
    fs::set_permissions(m.join("member"), fs::Permissions::from_mode(0o2666))
        .expect("chmod member");
    make("truncated", 0o6777);
    make("sized", 0o4777);

    let out = run_as(
        USER,
        "echo x >> by-user && echo x >> no-gexec && echo x >> member && truncate -s 0 truncated",
        m,
    );
    assert!(
        out.status.success(),
        "{}",
        show_output("writes by uid 65534", &out)
    );
    let out = run_as(
        USER,
        "python3 -c \"import os; f=os.open('sized', os.O_WRONLY); os.posix_fallocate(f, 0, 1 << 16)\"",
        m,
    );
    assert!(
        out.status.success(),
        "{}",
        show_output("fallocate by uid 65534", &out)
    );
    {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m.join("by-root"))
            .expect("open by-root");
        f.write_all(b"root\n").expect("append as root");
    }
    let want = [
        ("by-user", 0o0777),
        ("by-root", 0o6777),
        ("no-gexec", 0o0666),
        ("member", 0o2666),
        ("truncated", 0o0777),
        ("sized", 0o0777),
    ];
    let mode = |p: std::path::PathBuf| {
        fs::metadata(&p)
            .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
            .mode()
            & 0o7777
    };
    for (name, bits) in want {
        assert_eq!(
            mode(m.join(name)),
            bits,
            "{name}: mode on the mount after the change"
        );
        assert_eq!(
            mode(h.backing().join(name)),
            bits,
            "{name}: mode on the backing volume"
        );
    }
    h.cp();
    for (name, bits) in want {
        assert_eq!(
            mode(h.image().join(name)),
            bits,
            "{name}: mode in the image"
        );
    }
    assert_trees_equal_named(h.backing(), &h.image(), "backing", "image");
}
