"""The seed notebook's pure-Python math, transcribed line by line: the independent reference.

Only these changes from the seed: data, weights and the layer-size constants are arguments
(`sizes = (INPUT_LAYER_SIZE, HIDDEN_LAYER_SIZE, OUTPUT_LAYER_SIZE)`, bound to the seed's names
at the top of each function so the bodies read as in the notebook); SGD_minibatch draws from a
`random.Random` passed in, or takes the batches' indices; the optimizers return the
`weights_biases` dict instead of pickling it; the accuracy prints are gone; unpack() takes the
unpickled dict instead of opening 'nn/weights_biases.pkl'. Loops, update order and in-place
updates are the seed's. Weights are lists of rows, `weights[out][in]`.

Seed quirk kept: compute_neuron_values applies no ReLU to any layer whose width equals
OUTPUT_LAYER_SIZE, so give hidden layers a width different from the output's.
Not imported by distmlp: test-only, and it must never share code with what it checks.
"""

import math
import random

SEED_SIZES = (28 * 28, 16, 10)  # INPUT_LAYER_SIZE, HIDDEN_LAYER_SIZE, OUTPUT_LAYER_SIZE
PICKLE_KEYS = ('weights_input_to_hidden1', 'biases_hidden1', 'weights_hidden1_to_hidden2',
               'biases_hidden2', 'weights_hidden2_to_output', 'biases_output')


def preprocess_images(image_data, size, rows=28, cols=28):
    """The image half of load_and_preprocess_data: flat bytes -> lists of pixel / 255.0."""
    images = []
    for i in range(size):
        start = i * rows * cols
        end = (i + 1) * rows * cols  # noqa: F841  (unused in the seed too)
        image = [
            [pixel / 255.0 for pixel in image_data[start + j * cols : start + (j + 1) * cols]]
            for j in range(rows)
        ]
        images.append([pixel for row in image for pixel in row])
    return images


#logic functions
def relu(x):
    return max(0, x)


def relu_derivative(x):
    return 1 * (x > 0)


def softmax(x):
    max_x = max(x)
    exp_x = [math.exp(xi - max_x) for xi in x]
    sum_exp_x = sum(exp_x)
    softmax_x = [xi / sum_exp_x for xi in exp_x]
    return softmax_x


def compute_neuron_values(layer1_size, layer2_size, layer1, weights, biases, OUTPUT_LAYER_SIZE=SEED_SIZES[2]):
    layer2 = []
    for i in range(layer2_size): # 16
        weighted_sum = 0
        for j in range(layer1_size): # 784
            weighted_sum += layer1[j] * weights[i][j]
        weighted_sum += biases[i]
        if layer2_size == OUTPUT_LAYER_SIZE:
            layer2.append(weighted_sum)
        else:
            layer2.append(relu(weighted_sum))
    return layer2


def unpack(weights_biases_g):
    """The seed's unpack() on an already unpickled dict: (weights, biases) lists of 3."""
    weights_input_to_hidden1 = weights_biases_g['weights_input_to_hidden1']
    biases_hidden1 = weights_biases_g['biases_hidden1']
    weights_hidden1_to_hidden2 = weights_biases_g['weights_hidden1_to_hidden2']
    biases_hidden2 = weights_biases_g['biases_hidden2']
    weights_hidden2_to_output = weights_biases_g['weights_hidden2_to_output']
    biases_output = weights_biases_g['biases_output']

    weights = [
       weights_input_to_hidden1,
       weights_hidden1_to_hidden2,
       weights_hidden2_to_output
    ]

    biases = [
        biases_hidden1,
        biases_hidden2,
        biases_output
    ]

    return weights, biases


def forward_pass(input_layer, weights, biases, sizes=SEED_SIZES):
    INPUT_LAYER_SIZE, HIDDEN_LAYER_SIZE, OUTPUT_LAYER_SIZE = sizes
    #unpack weights and biases as we need them for a forward pass

    weights_input_to_hidden1 = weights[0]
    weights_hidden1_to_hidden2 = weights[1]
    weights_hidden2_to_output = weights[2]

    biases_hidden1 = biases[0]
    biases_hidden2 = biases[1]
    biases_output = biases[2]

    #calculate activations for each layer

    hidden_layer_1 = compute_neuron_values(INPUT_LAYER_SIZE,
                                        HIDDEN_LAYER_SIZE,
                                        input_layer,
                                        weights_input_to_hidden1,
                                        biases_hidden1,
                                        OUTPUT_LAYER_SIZE)


    hidden_layer_2 = compute_neuron_values(HIDDEN_LAYER_SIZE,
                                        HIDDEN_LAYER_SIZE,
                                        hidden_layer_1,
                                        weights_hidden1_to_hidden2,
                                        biases_hidden2,
                                        OUTPUT_LAYER_SIZE)


    output_layer = compute_neuron_values(HIDDEN_LAYER_SIZE,
                                        OUTPUT_LAYER_SIZE,
                                        hidden_layer_2,
                                        weights_hidden2_to_output,
                                        biases_output,
                                        OUTPUT_LAYER_SIZE)

    return [hidden_layer_1, hidden_layer_2, output_layer]


def test_neural_network(test_images, test_labels, weights, biases, sizes=SEED_SIZES):
    """Accuracy in percent, as the seed computes it."""
    num_correct = 0
    num_test_images = len(test_images)

    for i in range(num_test_images):
        image = test_images[i]
        true_label = test_labels[i]

        output = forward_pass(image, weights, biases, sizes)[2]
        predicted_label = output.index(max(output))

        # Compare with true label
        if predicted_label == true_label:
            num_correct += 1

    # Calculate accuracy
    accuracy = num_correct / num_test_images * 100
    return accuracy


test_neural_network.__test__ = False  # a seed name, not a pytest test


def SGD(training_images_set, training_labels_set, weights, biases, learning_rate=0.001, sizes=SEED_SIZES):
    """Per-example SGD over the whole set, updating weights and biases in place; returns the dict."""
    #pure SGD: for every image, update weights and biases

    weights_input_to_hidden1 = weights[0]
    weights_hidden1_to_hidden2 = weights[1]
    weights_hidden2_to_output = weights[2]

    biases_hidden1 = biases[0]
    biases_hidden2 = biases[1]
    biases_output = biases[2]

    for i in range(len(training_images_set)):

        new_weights = [
            weights_input_to_hidden1,
            weights_hidden1_to_hidden2,
            weights_hidden2_to_output
        ]

        new_biases = [
            biases_hidden1,
            biases_hidden2,
            biases_output
        ]

        input_layer = training_images_set[i]
        label = training_labels_set[i]
        neuron_activations = forward_pass(input_layer, new_weights, new_biases, sizes)

        hidden_layer_1 = neuron_activations[0]
        hidden_layer_2 = neuron_activations[1]
        output_layer = softmax(neuron_activations[2])

        actual_output = [0] * len(output_layer)
        actual_output[label] = 1

        #output deltas
        output_layer_deltas = [output_layer[i] - actual_output[i] for i in range(len(output_layer))]

        # layer 2 deltas ----------------
        hidden_layer_2_deltas = []
        for i in range(len(hidden_layer_2)): # len 16
            delta = 0
            for j in range(len(output_layer)): # len 10
                delta += weights_hidden2_to_output[j][i] * output_layer_deltas[j]
            delta *= relu_derivative(hidden_layer_2[i])
            hidden_layer_2_deltas.append(delta)


        #hidden layer 1 deltas ----------------
        hidden_layer_1_deltas = []

        for i in range(len(hidden_layer_1)):
            delta = 0
            for j in range(len(hidden_layer_2)):
                delta += weights_hidden1_to_hidden2[j][i] * hidden_layer_2_deltas[j]
            delta *= relu_derivative(hidden_layer_1[i])
            hidden_layer_1_deltas.append(delta)


        #now update the weights and biases
        for i in range(len(hidden_layer_2)): #len 16
            for j in range(len(output_layer)): # len 10
                weights_hidden2_to_output[j][i] -= learning_rate * output_layer_deltas[j] * hidden_layer_2[i]

        for i in range(len(hidden_layer_1)):
            for j in range(len(hidden_layer_2)):
                weights_hidden1_to_hidden2[j][i] -= learning_rate * hidden_layer_2_deltas[j] * hidden_layer_1[i]

        for i in range(len(input_layer)):
            for j in range(len(hidden_layer_1)):
                weights_input_to_hidden1[j][i] -= learning_rate * hidden_layer_1_deltas[j] * input_layer[i]

        for i in range(len(biases_output)):
            biases_output[i] -= learning_rate * output_layer_deltas[i]

        for i in range(len(biases_hidden2)):
            biases_hidden2[i] -= learning_rate * hidden_layer_2_deltas[i]

        for i in range(len(biases_hidden1)):
            biases_hidden1[i] -= learning_rate * hidden_layer_1_deltas[i]


    weights_biases = {
        'weights_input_to_hidden1': weights_input_to_hidden1,
        'biases_hidden1': biases_hidden1,
        'weights_hidden1_to_hidden2': weights_hidden1_to_hidden2,
        'biases_hidden2': biases_hidden2,
        'weights_hidden2_to_output': weights_hidden2_to_output,
        'biases_output': biases_output
    }

    return weights_biases


def SGD_minibatch(training_images_set, training_labels_set, weights, biases, learning_rate=0.001, minibatch_size=32,
                  batches=10000, sizes=SEED_SIZES, rng=None, batch_indices=None):
    """Minibatch SGD in place; batch k uses batch_indices[k] if given, else rng.sample as the seed."""
    INPUT_LAYER_SIZE, HIDDEN_LAYER_SIZE, OUTPUT_LAYER_SIZE = sizes
    rng = rng or random.Random(0)
    # average gradients for minibatchand apply in backpass


    weights_input_to_hidden1 = weights[0]
    weights_hidden1_to_hidden2 = weights[1]
    weights_hidden2_to_output = weights[2]

    biases_hidden1 = biases[0]
    biases_hidden2 = biases[1]
    biases_output = biases[2]

    for batch in range(batches):
        if batch_indices is None:
            minibatch_indices = rng.sample(range(len(training_images_set)), minibatch_size)
        else:
            minibatch_indices = batch_indices[batch]
        new_weights = [weights_input_to_hidden1, weights_hidden1_to_hidden2, weights_hidden2_to_output]
        new_biases = [biases_hidden1, biases_hidden2, biases_output]

        # Initialize accumulators for gradients and deltas
        final_output_deltas = [0] * OUTPUT_LAYER_SIZE
        final_hidden2_deltas = [0] * HIDDEN_LAYER_SIZE
        final_hidden1_deltas = [0] * HIDDEN_LAYER_SIZE

        gradients_hidden2_to_output = [[0 for _ in range(HIDDEN_LAYER_SIZE)] for _ in range(OUTPUT_LAYER_SIZE)]
        gradients_hidden1_to_hidden2 = [[0 for _ in range(HIDDEN_LAYER_SIZE)] for _ in range(HIDDEN_LAYER_SIZE)]
        gradients_input_to_hidden1 = [[0 for _ in range(INPUT_LAYER_SIZE)] for _ in range(HIDDEN_LAYER_SIZE)]

        for i in minibatch_indices:
            input_layer = training_images_set[i]
            label = training_labels_set[i]
            neuron_activations = forward_pass(input_layer, new_weights, new_biases, sizes)

            hidden_layer_1 = neuron_activations[0]
            hidden_layer_2 = neuron_activations[1]
            output_layer = softmax(neuron_activations[2])

            actual_output = [0] * len(output_layer)
            actual_output[label] = 1

            output_layer_deltas = [output_layer[i] - actual_output[i] for i in range(len(output_layer))]

            #hidden2 to output gradients
            for j in range(len(output_layer)):
                for i in range(len(hidden_layer_2)):
                    gradient = output_layer_deltas[j] * hidden_layer_2[i]
                    gradients_hidden2_to_output[j][i] += gradient


            #hidden1 to hidden2 output gradients
            hidden_layer_2_deltas = [0] * HIDDEN_LAYER_SIZE
            for j in range(len(hidden_layer_2)):
                delta = sum(weights_hidden2_to_output[k][j] * output_layer_deltas[k] for k in range(OUTPUT_LAYER_SIZE))
                delta *= relu_derivative(hidden_layer_2[j])
                hidden_layer_2_deltas[j] = delta

            for i in range(len(hidden_layer_1)):
                for j in range(len(hidden_layer_2)):
                    gradient = hidden_layer_2_deltas[j] * hidden_layer_1[i]
                    gradients_hidden1_to_hidden2[j][i] += gradient

            #input to hidden1 gradients
            hidden_layer_1_deltas = [0] * HIDDEN_LAYER_SIZE
            for j in range(len(hidden_layer_1)):
                delta = sum(weights_hidden1_to_hidden2[k][j] * hidden_layer_2_deltas[k] for k in range(HIDDEN_LAYER_SIZE))
                delta *= relu_derivative(hidden_layer_1[j])
                hidden_layer_1_deltas[j] = delta

            for i in range(len(input_layer)):
                for j in range(len(hidden_layer_1)):
                    gradient = hidden_layer_1_deltas[j] * input_layer[i]
                    gradients_input_to_hidden1[j][i] += gradient

            for i in range(OUTPUT_LAYER_SIZE):
                final_output_deltas[i] += output_layer_deltas[i]

            for i in range(HIDDEN_LAYER_SIZE):
                final_hidden2_deltas[i] += hidden_layer_2_deltas[i]

            for i in range(HIDDEN_LAYER_SIZE):
                final_hidden1_deltas[i] += hidden_layer_1_deltas[i]

        # Update weights and biases with averaged gradients

        for i in range(HIDDEN_LAYER_SIZE):
            for j in range(OUTPUT_LAYER_SIZE):
                weights_hidden2_to_output[j][i] -= learning_rate * gradients_hidden2_to_output[j][i] / minibatch_size

        for i in range(HIDDEN_LAYER_SIZE):
            for j in range(HIDDEN_LAYER_SIZE):
                weights_hidden1_to_hidden2[j][i] -= learning_rate * gradients_hidden1_to_hidden2[j][i] / minibatch_size

        for i in range(INPUT_LAYER_SIZE):
            for j in range(HIDDEN_LAYER_SIZE):
                weights_input_to_hidden1[j][i] -= learning_rate * gradients_input_to_hidden1[j][i] / minibatch_size

        for i in range(len(biases_output)):
            biases_output[i] -= learning_rate * final_output_deltas[i] / minibatch_size

        for i in range(len(biases_hidden2)):
            biases_hidden2[i] -= learning_rate * final_hidden2_deltas[i] / minibatch_size

        for i in range(len(biases_hidden1)):
            biases_hidden1[i] -= learning_rate * final_hidden1_deltas[i] / minibatch_size

    weights_biases = {
        'weights_input_to_hidden1': weights_input_to_hidden1,
        'biases_hidden1': biases_hidden1,
        'weights_hidden1_to_hidden2': weights_hidden1_to_hidden2,
        'biases_hidden2': biases_hidden2,
        'weights_hidden2_to_output': weights_hidden2_to_output,
        'biases_output': biases_output
    }

    return weights_biases


def GD(training_images_set, training_labels_set, weights, biases, learning_rate=0.05, epochs=100, sizes=SEED_SIZES):
    """Full-batch gradient descent in place, `epochs` updates; returns the weights_biases dict."""
    INPUT_LAYER_SIZE, HIDDEN_LAYER_SIZE, OUTPUT_LAYER_SIZE = sizes
    #SGD-mini but the minibatch is the entire dataset

    weights_input_to_hidden1 = weights[0]
    weights_hidden1_to_hidden2 = weights[1]
    weights_hidden2_to_output = weights[2]

    biases_hidden1 = biases[0]
    biases_hidden2 = biases[1]
    biases_output = biases[2]

    all_images = len(training_images_set)

    for epoch in range(epochs):
        new_weights = [weights_input_to_hidden1, weights_hidden1_to_hidden2, weights_hidden2_to_output]
        new_biases = [biases_hidden1, biases_hidden2, biases_output]

        # Initialize accumulators for gradients and deltas
        final_output_deltas = [0] * OUTPUT_LAYER_SIZE
        final_hidden2_deltas = [0] * HIDDEN_LAYER_SIZE
        final_hidden1_deltas = [0] * HIDDEN_LAYER_SIZE

        gradients_hidden2_to_output = [[0 for _ in range(HIDDEN_LAYER_SIZE)] for _ in range(OUTPUT_LAYER_SIZE)]
        gradients_hidden1_to_hidden2 = [[0 for _ in range(HIDDEN_LAYER_SIZE)] for _ in range(HIDDEN_LAYER_SIZE)]
        gradients_input_to_hidden1 = [[0 for _ in range(INPUT_LAYER_SIZE)] for _ in range(HIDDEN_LAYER_SIZE)]

        for i in range(all_images):
            input_layer = training_images_set[i]
            label = training_labels_set[i]
            neuron_activations = forward_pass(input_layer, new_weights, new_biases, sizes)

            hidden_layer_1 = neuron_activations[0]
            hidden_layer_2 = neuron_activations[1]
            output_layer = softmax(neuron_activations[2])

            actual_output = [0] * len(output_layer)
            actual_output[label] = 1

            output_layer_deltas = [output_layer[i] - actual_output[i] for i in range(len(output_layer))]

            #hidden2 to output gradients
            for j in range(len(output_layer)):
                for i in range(len(hidden_layer_2)):
                    gradient = output_layer_deltas[j] * hidden_layer_2[i]
                    gradients_hidden2_to_output[j][i] += gradient


            #hidden1 to hidden2 output gradients
            hidden_layer_2_deltas = [0] * HIDDEN_LAYER_SIZE
            for j in range(len(hidden_layer_2)):
                delta = sum(weights_hidden2_to_output[k][j] * output_layer_deltas[k] for k in range(OUTPUT_LAYER_SIZE))
                delta *= relu_derivative(hidden_layer_2[j])
                hidden_layer_2_deltas[j] = delta

            for i in range(len(hidden_layer_1)):
                for j in range(len(hidden_layer_2)):
                    gradient = hidden_layer_2_deltas[j] * hidden_layer_1[i]
                    gradients_hidden1_to_hidden2[j][i] += gradient

            #input to hidden1 gradients
            hidden_layer_1_deltas = [0] * HIDDEN_LAYER_SIZE
            for j in range(len(hidden_layer_1)):
                delta = sum(weights_hidden1_to_hidden2[k][j] * hidden_layer_2_deltas[k] for k in range(HIDDEN_LAYER_SIZE))
                delta *= relu_derivative(hidden_layer_1[j])
                hidden_layer_1_deltas[j] = delta

            for i in range(len(input_layer)):
                for j in range(len(hidden_layer_1)):
                    gradient = hidden_layer_1_deltas[j] * input_layer[i]
                    gradients_input_to_hidden1[j][i] += gradient

            for i in range(OUTPUT_LAYER_SIZE):
                final_output_deltas[i] += output_layer_deltas[i]

            for i in range(HIDDEN_LAYER_SIZE):
                final_hidden2_deltas[i] += hidden_layer_2_deltas[i]

            for i in range(HIDDEN_LAYER_SIZE):
                final_hidden1_deltas[i] += hidden_layer_1_deltas[i]

        # Update weights and biases with averaged gradients

        for i in range(HIDDEN_LAYER_SIZE):
            for j in range(OUTPUT_LAYER_SIZE):
                weights_hidden2_to_output[j][i] -= learning_rate * gradients_hidden2_to_output[j][i] / all_images

        for i in range(HIDDEN_LAYER_SIZE):
            for j in range(HIDDEN_LAYER_SIZE):
                weights_hidden1_to_hidden2[j][i] -= learning_rate * gradients_hidden1_to_hidden2[j][i] / all_images

        for i in range(INPUT_LAYER_SIZE):
            for j in range(HIDDEN_LAYER_SIZE):
                weights_input_to_hidden1[j][i] -= learning_rate * gradients_input_to_hidden1[j][i] / all_images

        for i in range(len(biases_output)):
            biases_output[i] -= learning_rate * final_output_deltas[i] / all_images

        for i in range(len(biases_hidden2)):
            biases_hidden2[i] -= learning_rate * final_hidden2_deltas[i] / all_images

        for i in range(len(biases_hidden1)):
            biases_hidden1[i] -= learning_rate * final_hidden1_deltas[i] / all_images

    weights_biases = {
        'weights_input_to_hidden1': weights_input_to_hidden1,
        'biases_hidden1': biases_hidden1,
        'weights_hidden1_to_hidden2': weights_hidden1_to_hidden2,
        'biases_hidden2': biases_hidden2,
        'weights_hidden2_to_output': weights_hidden2_to_output,
        'biases_output': biases_output
    }

    return weights_biases


def he_initialization(fan_in, fan_out, rng=random):
    std = math.sqrt(2.0 / fan_in)
    return [[rng.gauss(0, std) for _ in range(fan_in)] for _ in range(fan_out)]


def fresh_weights_biases(rng, sizes=SEED_SIZES):
    """The seed's 'fresh set of weights and biases' dict, drawn from rng (a random.Random)."""
    INPUT_LAYER_SIZE, HIDDEN_LAYER_SIZE, OUTPUT_LAYER_SIZE = sizes
    return {
        'weights_input_to_hidden1': he_initialization(INPUT_LAYER_SIZE, HIDDEN_LAYER_SIZE, rng),
        'biases_hidden1': [0.0 for _ in range(HIDDEN_LAYER_SIZE)],
        'weights_hidden1_to_hidden2': he_initialization(HIDDEN_LAYER_SIZE, HIDDEN_LAYER_SIZE, rng),
        'biases_hidden2': [0.0 for _ in range(HIDDEN_LAYER_SIZE)],
        'weights_hidden2_to_output': he_initialization(HIDDEN_LAYER_SIZE, OUTPUT_LAYER_SIZE, rng),
        'biases_output': [0.0 for _ in range(OUTPUT_LAYER_SIZE)]
    }


# ------------------------------------------------ bridges to distmlp's arrays (tests only)


def to_params(weights_biases):
    """Seed dict -> distmlp params {"W1": (16, 784), "b1": (16,), ...} as float64 arrays."""
    import numpy as np
    return {name: np.array(weights_biases[key], dtype=np.float64)
            for name, key in zip(("W1", "b1", "W2", "b2", "W3", "b3"), PICKLE_KEYS)}


def from_params(params):
    """distmlp params (3 layers) -> the seed's dict of nested Python float lists."""
    return {key: params[name].astype(float).tolist()
            for name, key in zip(("W1", "b1", "W2", "b2", "W3", "b3"), PICKLE_KEYS)}


def images_from_uint8(x):
    """uint8 images (n, 784) -> the seed's lists of pixel / 255.0, through preprocess_images."""
    return preprocess_images(x.tobytes(), len(x))
