/* The one weights loader of every canao runtime: weights.bin is a 64-byte header (magic "CANAOW01")
 * and the packed weights, mapped read-only (pages are read as the model touches them; several
 * processes share them). Static functions in a header, as canao_pool.h. */
#ifndef CANAO_WEIGHTS_H
#define CANAO_WEIGHTS_H
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define CANAO_WEIGHTS_MAGIC "CANAOW01"
#define CANAO_WEIGHTS_HEADER 64

/* The mapping of `path` (its packed weights start CANAO_WEIGHTS_HEADER bytes in), whose size must be
 * the header plus `payload` bytes; *map_bytes gets the mapping's size for munmap. NULL with a one-line
 * reason in err: missing, truncated or from another build, not a weights file. */
static void *canao_map_weights(const char *path, long payload, size_t *map_bytes, char *err, int n) {
    const int fd = open(path, O_RDONLY);
    if (fd < 0) {
        snprintf(err, n, "cannot open weights %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (unsigned long)st.st_size != CANAO_WEIGHTS_HEADER + (unsigned long)payload) {
        snprintf(err, n, "weights %s has %ld bytes, this library expects %ld: truncated or from another build", path,
                 (long)st.st_size, (long)(CANAO_WEIGHTS_HEADER + payload));
        close(fd);
        return NULL;
    }
    void *map = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        snprintf(err, n, "cannot map weights %s: %s", path, strerror(errno));
        return NULL;
    }
    if (memcmp(map, CANAO_WEIGHTS_MAGIC, 8) != 0) {
        snprintf(err, n, "%s is not a canao weights file", path);
        munmap(map, st.st_size);
        return NULL;
    }
    *map_bytes = st.st_size;
    return map;
}
#endif
