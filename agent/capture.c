/* The cb_eval callback of a pipeline stage that is not last (agent/capture.py builds this
 * file; agent/runtime.py uses it).
 *
 * llama.cpp's scheduler asks the callback about every node of a decode's graph (ask = true:
 * "do you want this node's data?") and, for a node it wanted, calls it again once the node
 * is computed (ask = false). A stage wants one node, the residual stream after its last layer
 * (target, e.g. "l_out-20"), and appends its rows to out. Asked from Python, the ~30 asks per
 * layer cost ~4 % of a decode step and take the GIL each time (bench/readout.py).
 *
 * No ggml headers or libraries are needed: the three ggml functions come as pointers in the
 * struct, filled in by agent/capture.py from the libggml-base that llama.cpp itself loaded. */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

struct ggml_tensor;

struct capture {
    const char * (*get_name)(const struct ggml_tensor *);
    size_t (*nbytes)(const struct ggml_tensor *);
    void (*tensor_get)(const struct ggml_tensor *, void *, size_t, size_t);
    const char * target;    /* the node's name */
    char * out;             /* where its rows go, one decode's after the other's */
    size_t capacity;        /* bytes at out */
    size_t filled;          /* bytes written since the caller last set it to 0 */
    int overflow;           /* a node did not fit: set, and the node is not copied */
};

bool edgefleet_capture(struct ggml_tensor * t, bool ask, void * user) {
    struct capture * c = user;
    if (strcmp(c->get_name(t), c->target) != 0) {
        return !ask;        /* not wanted; a node handed over is never another's, but go on */
    }
    if (ask) {
        return true;
    }
    size_t n = c->nbytes(t);
    if (c->filled + n > c->capacity) {
        c->overflow = 1;
        return true;
    }
    c->tensor_get(t, c->out + c->filled, 0, n);
    c->filled += n;
    return true;
}
