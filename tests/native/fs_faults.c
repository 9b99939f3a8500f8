/* LD_PRELOAD shim for tests, making one folder behave like a full or a read-only filesystem:
 * - writes to (or allocating space for) any file whose path contains $FULL_DISK_PATH fail with ENOSPC (a full
 *   disk);
 * - opening for writing any path that contains $READONLY_PATH fails with EROFS (a read-only mount).
 * - removing a file whose path contains $KILL_ON_UNLINK, or a folder whose path contains $KILL_ON_RMDIR, kills the
 *   process (see the end).
 * Everything else works normally. Python's file objects and torch's zip writer (libstdc++
 * streams) both end in these libc calls. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int is_full(int fd) {
    const char *needle = getenv("FULL_DISK_PATH");
    char link[64], path[4096];
    if (needle == NULL || *needle == '\0' || fd < 3) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = '\0';
    return strstr(path, needle) != NULL;
}

#define REAL(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)
#define FAIL_IF_FULL(fd) if (is_full(fd)) { errno = ENOSPC; return -1; }

ssize_t write(int fd, const void *buf, size_t count) {
    REAL(write); FAIL_IF_FULL(fd); return real(fd, buf, count);
}
ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    REAL(writev); FAIL_IF_FULL(fd); return real(fd, iov, iovcnt);
}
ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    REAL(pwrite); FAIL_IF_FULL(fd); return real(fd, buf, count, offset);
}
ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    REAL(pwrite64); FAIL_IF_FULL(fd); return real(fd, buf, count, offset);
}

/* posix_fallocate reports its error as the return value, not in errno. */
int posix_fallocate(int fd, off_t offset, off_t len) {
    REAL(posix_fallocate); if (is_full(fd)) return ENOSPC; return real(fd, offset, len);
}
int posix_fallocate64(int fd, off64_t offset, off64_t len) {
    REAL(posix_fallocate64); if (is_full(fd)) return ENOSPC; return real(fd, offset, len);
}

static int is_readonly(const char *path, int flags) {
    const char *needle = getenv("READONLY_PATH");
    if (needle == NULL || *needle == '\0' || path == NULL) return 0;
    return (flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC)) && strstr(path, needle) != NULL;
}

#define OPEN_LIKE(name, ...) { \
    va_list args; mode_t mode = 0; \
    va_start(args, flags); if (flags & (O_CREAT | O_TMPFILE)) mode = va_arg(args, mode_t); va_end(args); \
    REAL(name); \
    if (is_readonly(path, flags)) { errno = EROFS; return -1; } \
    return real(__VA_ARGS__, flags, mode); }

int open(const char *path, int flags, ...) OPEN_LIKE(open, path)
int open64(const char *path, int flags, ...) OPEN_LIKE(open64, path)
int openat(int dirfd, const char *path, int flags, ...) OPEN_LIKE(openat, dirfd, path)
int openat64(int dirfd, const char *path, int flags, ...) OPEN_LIKE(openat64, dirfd, path)

/* Removing a file whose path contains $KILL_ON_UNLINK, or a folder whose path contains $KILL_ON_RMDIR, SIGKILLs
 * the process first: a crash at a chosen point of a deletion (shutil.rmtree removes by name under a folder fd:
 * unlinkat). Only a deletion removes a folder, never a save (which may unlink a file of the same tag first), so
 * $KILL_ON_RMDIR kills at one chosen deletion. */
static void kill_if_doomed(const char *variable, const char *path) {
    const char *needle = getenv(variable);
    if (needle != NULL && *needle != '\0' && path != NULL && strstr(path, needle) != NULL) kill(getpid(), SIGKILL);
}

int unlink(const char *path) {
    REAL(unlink); kill_if_doomed("KILL_ON_UNLINK", path); return real(path);
}
int unlinkat(int dirfd, const char *path, int flags) {
    REAL(unlinkat); kill_if_doomed("KILL_ON_UNLINK", path);
    if (flags & AT_REMOVEDIR) kill_if_doomed("KILL_ON_RMDIR", path);
    return real(dirfd, path, flags);
}
int rmdir(const char *path) {
    REAL(rmdir); kill_if_doomed("KILL_ON_RMDIR", path); return real(path);
}
